"""Typed readings and events, and the pure state machines that turn one into the other.

The driver turns frames into :class:`Reading` values (one per channel per sample, in physical
units); :class:`BoardProcessor` turns a board's readings into :class:`ShelfEvent`,
:class:`DoorEvent` and :class:`TemperatureAlert` values. Each is a frozen dataclass checked on
construction, and the processor does no I/O, so picks, put-backs, door edges and
alert hysteresis are all tested by feeding readings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hardware.planogram import Planogram, QuantityEstimate, estimate_quantity
from hardware.stability import StabilityDetector, StabilitySettings, StableChange

Kind = Literal["load_cell", "door", "temperature"]


@dataclass(frozen=True)
class Reading:
    """One channel's value at one moment, in physical units (g, open state 0/1, degC).

    ``at`` is the host's wall clock; ``board_time`` the board's uptime in seconds, which the
    stability detector uses so that a board emulated slower than real time is judged by its own clock.
    """

    board: str
    channel: int
    kind: Kind
    value: float
    unit: str
    at: float
    board_time: float = 0.0
    ok: bool = True

    def __post_init__(self) -> None:
        if self.channel < 0 or not math.isfinite(self.value) or self.kind not in ("load_cell", "door", "temperature"):
            raise ValueError(f"invalid reading {self!r}")

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a 'type' key ('reading')."""
        return {"type": "reading", **asdict(self)}


@dataclass(frozen=True)
class ShelfEvent:
    """A settled weight change on a shelf slot: a pick (quantity < 0) or a put-back (> 0)."""

    board: str
    channel: int
    slot: str
    product: str
    delta_g: float
    before_g: float
    after_g: float
    quantity: int
    confidence: float
    at: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence {self.confidence} outside 0..1")
        if abs(self.after_g - self.before_g - self.delta_g) > 0.01:
            raise ValueError("delta_g must equal after_g - before_g")

    @property
    def type(self) -> str:
        """Return the event type as sent to the agent."""
        return "shelf_change"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a 'type' key."""
        return {"type": self.type, **asdict(self)}


@dataclass(frozen=True)
class DoorEvent:
    """The door contact changed: 'door_opened' or 'door_closed'."""

    board: str
    channel: int
    type: Literal["door_opened", "door_closed"]
    at: float

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a 'type' key."""
        return asdict(self)


@dataclass(frozen=True)
class TemperatureAlert:
    """A fridge got too warm or too cold ('firing'), or came back ('resolved')."""

    board: str
    channel: int
    name: Literal["temperature_high", "temperature_low"]
    state: Literal["firing", "resolved"]
    value_c: float
    threshold_c: float
    at: float

    @property
    def type(self) -> str:
        """Return the event type used in JSON output."""
        return "alert"

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict with a 'type' key ('alert')."""
        return {"type": self.type, **asdict(self)}


Event = ShelfEvent | DoorEvent | TemperatureAlert


class TemperatureSettings(BaseModel):
    """Alert thresholds of the temperature channels (fridges)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    high_c: float = Field(8.0, description="Fire 'temperature_high' when a reading exceeds this (degC).")
    low_c: float = Field(-30.0, description="Fire 'temperature_low' when a reading falls below this (degC).")
    hysteresis_c: float = Field(
        1.0,
        ge=0,
        le=20,
        description="An alert resolves only once the value is this far back inside the limit. Larger stops "
        "flapping around the threshold; smaller resolves sooner.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> TemperatureSettings:
        if self.low_c + self.hysteresis_c >= self.high_c - self.hysteresis_c:
            raise ValueError(
                f"low_c ({self.low_c}) + hysteresis_c must stay below high_c ({self.high_c}) - hysteresis_c: widen the band"
            )
        return self


class BoardProcessor:
    """Turn one board's readings into shelf, door and temperature events (pure, no I/O)."""

    def __init__(
        self,
        board: str,
        planogram: Planogram,
        stability: StabilitySettings,
        temperature: TemperatureSettings,
        noise_g: float = 2.0,
    ) -> None:
        self.board = board
        self.planogram = planogram
        self.stability = stability
        self.temperature = temperature
        self.noise_g = noise_g
        self._detectors: dict[int, StabilityDetector] = {}
        self._door: dict[int, bool] = {}
        self._alerts: dict[tuple[int, str], bool] = {}

    def reset(self) -> None:
        """Forget levels and door states (after a reconnect); alert states are kept."""
        for d in self._detectors.values():
            d.reset()
        self._door.clear()

    def reset_channel(self, channel: int) -> None:
        """Forget a load-cell channel's level (after TARE or CALIBRATE moved its zero)."""
        if channel in self._detectors:
            self._detectors[channel].reset()

    def feed(self, reading: Reading) -> list[Event]:
        """Add one reading; return the events it completes (usually none)."""
        if not reading.ok:
            return []
        if reading.kind == "load_cell":
            return self._load_cell(reading)
        if reading.kind == "door":
            return self._door_edge(reading)
        return self._temperature(reading)

    def feed_batch(self, channel: int, kind: Kind, times: Sequence[float], values: Sequence[float], at: float) -> list[tuple[int, Event]]:
        """Add one channel's OK readings in order (board times, values, all received at ``at``).

        Return (index, event) for every event :meth:`feed` would have returned for the reading at
        that index, in the same order: the serial driver's fast path feeds a whole read of the port
        per channel at once, and builds no :class:`Reading` for the state machines.
        """
        if not values:
            return []
        if kind == "load_cell":
            det = self._detector(channel)
            return [(k, self._shelf_event(channel, change, at)) for k, change in det.update_many(times, values)]
        if kind == "door":
            was_open = self._door.get(channel)
            # no edge within the batch: every value on the side the door was already on (C-level min/max)
            if was_open is not None and (min(values) >= 0.5 if was_open else max(values) < 0.5):
                return []
            out: list[tuple[int, Event]] = []
            for k, v in enumerate(values):
                is_open = v >= 0.5
                if was_open is not None and was_open != is_open:
                    out.append((k, DoorEvent(self.board, channel, "door_opened" if is_open else "door_closed", at)))
                was_open = is_open
            self._door[channel] = is_open
            return out
        t = self.temperature
        alerts = self._alerts
        if (
            not alerts.get((channel, "temperature_high"), False)
            and not alerts.get((channel, "temperature_low"), False)
            and max(values) <= t.high_c
            and min(values) >= t.low_c
        ):
            return []  # nothing firing and nothing crosses a limit: no reading can change an alert
        return [(k, e) for k, v in enumerate(values) for e in self._temperature_value(channel, v, at)]

    def _detector(self, channel: int) -> StabilityDetector:
        det = self._detectors.get(channel)
        if det is None:  # not setdefault: that built (and dropped) a detector per reading
            det = self._detectors[channel] = StabilityDetector(self.stability)
        return det

    def _load_cell(self, r: Reading) -> list[Event]:
        change = self._detector(r.channel).update(r.board_time, r.value)
        if change is None:
            return []
        return [self._shelf_event(r.channel, change, r.at)]

    def _shelf_event(self, channel: int, change: StableChange, at: float) -> ShelfEvent:
        slot = self.planogram.slot_for(self.board, channel)
        if slot is None:  # not in the planogram: report grams, no quantity
            q, slot_name, product = QuantityEstimate(0, 0.0), f"{self.board}/{channel}", ""
        else:
            q = estimate_quantity(change.delta_g, slot.unit_weight_g, slot.unit_weight_sd_g, self.noise_g)
            slot_name, product = slot.slot, slot.product
        return ShelfEvent(
            board=self.board,
            channel=channel,
            slot=slot_name,
            product=product,
            delta_g=round(change.delta_g, 1),
            before_g=round(change.before_g, 1),
            after_g=round(change.before_g, 1) + round(change.delta_g, 1),
            quantity=q.quantity,
            confidence=q.confidence,
            at=at,
        )

    def _door_edge(self, r: Reading) -> list[Event]:
        is_open = r.value >= 0.5
        was_open = self._door.get(r.channel)
        self._door[r.channel] = is_open
        if was_open is None or was_open == is_open:
            return []
        return [DoorEvent(self.board, r.channel, "door_opened" if is_open else "door_closed", r.at)]

    def _temperature(self, r: Reading) -> list[Event]:
        return self._temperature_value(r.channel, r.value, r.at)

    def _temperature_value(self, channel: int, value: float, at: float) -> list[Event]:
        t = self.temperature
        out: list[Event] = []
        for name, over, back, threshold in (
            ("temperature_high", value > t.high_c, value <= t.high_c - t.hysteresis_c, t.high_c),
            ("temperature_low", value < t.low_c, value >= t.low_c + t.hysteresis_c, t.low_c),
        ):
            key = (channel, name)
            firing = self._alerts.get(key, False)
            if not firing and over:
                self._alerts[key] = True
                out.append(TemperatureAlert(self.board, channel, name, "firing", value, threshold, at))  # type: ignore[arg-type]
            elif firing and back:
                self._alerts[key] = False
                out.append(TemperatureAlert(self.board, channel, name, "resolved", value, threshold, at))  # type: ignore[arg-type]
        return out

"""``type: hardware``: a shelf sensor board over USB serial, through the hardware library.

The adapter between the agent's supervisor contract and ``hardware.driver.Driver``:

* ``shelf_change``, ``door_opened`` and ``door_closed`` go to the outbox as events at once
  (a pick is the ground truth of a cart, so it is never batched);
* temperature limits become ``temperature_high`` / ``temperature_low`` alerts (firing and
  resolved, with the driver's hysteresis); a board that goes away raises
  ``sensor_board_disconnected``, resolved when it says HELLO again;
* readings are downsampled here to one per channel per ``readings_interval_s`` (a board sends
  10 per second) and the agent reduces them further per telemetry window;
* the driver's metrics (frames, rejections by reason, lost frames, reconnects, reboots, age of
  the last reading per channel) live on the pipeline's own registry; the pipeline is itself a
  Prometheus collector of them (``registry.register(pipeline)`` puts them on the agent's /metrics);
* health carries the frame rate, the age of the newest reading, lost frames and every rejected
  frame, reconnect and reboot by reason (``errors_by_reason``), which the agent exports as
  ``shopfleet_agent_pipeline_errors_total{pipeline,reason}``;
* every ``gate_interval_s`` (and at once when the board goes away) the figures rollout gates judge
  go out through ``sink.gate_metric`` (:data:`GATE_METRICS`).

The driver reconnects on its own after an unplug, so ``run`` only returns when ``stop`` is set;
a bad planogram raises from ``run`` and the supervisor reports it with the file and key to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edge_agent.protocol import Reading
from edge_agent.supervisor import EventSink, OwnMetrics, PipelineConfigBase
from hardware.driver import DriverSettings

log = logging.getLogger(__name__)

READING_NAMES = {"load_cell": "shelf_weight_g", "door": "door_open", "temperature": "temperature_c"}

GATE_METRICS = {
    "hardware_fps": "sensor frames per second from the board (10 s window); 0 while the board is away",
    "hardware_bad_frame_ratio": "rejected and lost frames / all frames since the pipeline started",
}
"""Gate metrics this pipeline reports (name -> meaning); docs/agent.md lists them for policies."""

FPS_WINDOW_S = 10.0
"""Window over which the board's frame rate is counted."""


class Config(PipelineConfigBase):
    """A sensor board on this node's USB serial."""

    type: Literal["hardware"] = Field(description="Pipeline type: a shelf sensor board over USB serial.")
    serial: DriverSettings = Field(
        default_factory=DriverSettings, description="How to find the board (port or USB ids) and tune its detectors (docs/hardware.md)."
    )
    planogram: str | None = Field(
        None, description="Planogram YAML mapping board channels to slots and unit weights; without it events carry grams only."
    )
    readings_interval_s: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="Hand at most one reading per channel to the agent this often (0: every reading). Lower shows "
        "weight changes in telemetry sooner; higher saves CPU and outbox space.",
    )
    temperature_severity: Literal["info", "warning", "critical"] = Field(
        "critical", description="Severity of temperature alerts (a warm fridge spoils stock)."
    )
    gate_interval_s: float = Field(
        2.0, gt=0, le=3600, description="Report gate metrics (hardware_fps, ...) this often; the heartbeat sends the newest."
    )


class HardwarePipeline(OwnMetrics):
    """Run one sensor board under the agent's supervisor."""

    kind = "hardware"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.name
        self._lock = threading.Lock()
        self._driver: Any = None
        self._registry: Any = None
        self._detail = "not started"
        self._last_sent: dict[tuple[str, int], float] = {}
        self._frames_window: list[float] = []
        self._disconnected = False
        self._planogram: Any = None
        self._last_gates = 0.0

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Load the planogram, then keep the board connected and relay its events until stop is set."""
        from prometheus_client import CollectorRegistry

        from hardware.driver import Driver
        from hardware.planogram import load_planogram

        planogram = load_planogram(Path(self.config.planogram)) if self.config.planogram else None
        self._planogram = planogram
        with self._lock:
            if self._registry is None:  # keep counters across restarts, so errors_by_reason never decreases
                self._registry = CollectorRegistry()
                self._driver = Driver(self.config.serial, self._registry, planogram)
            else:
                self._driver = Driver(self.config.serial, self._registry, planogram, metrics=self._driver.metrics)
            self._detail = "looking for the board"
        self._driver.run(stop, lambda item: self._forward(item, sink))

    def _forward(self, item: Any, sink: EventSink) -> None:
        from hardware.driver import BoardStatus
        from hardware.events import DoorEvent, ShelfEvent, TemperatureAlert

        if isinstance(item, ShelfEvent):
            data = asdict(item)
            data.pop("at")
            sink.event("shelf_change", item.board, data, at=item.at)
        elif isinstance(item, DoorEvent):
            sink.event(item.type, item.board, {"board": item.board, "channel": item.channel}, at=item.at)
        elif isinstance(item, TemperatureAlert):
            source = f"{item.board}/{item.channel}"
            verb = "above" if item.name == "temperature_high" else "below"
            message = f"{source}: {item.value_c:.1f} C {verb} the limit of {item.threshold_c:.1f} C"
            data = {"value_c": item.value_c, "threshold_c": item.threshold_c}
            sink.alert(item.name, item.state, self.config.temperature_severity, source, message, data)
        elif isinstance(item, BoardStatus):
            self._status(item, sink)
        else:
            self._reading(item, sink)
        now = time.monotonic()
        if now - self._last_gates >= self.config.gate_interval_s:
            self._last_gates = now
            self.report_gates(sink)

    def report_gates(self, sink: EventSink) -> None:
        """Report :data:`GATE_METRICS` through ``sink``."""
        health = self.health()
        sink.gate_metric("hardware_fps", float(health["fps"]), "lower")
        frames, bad = self._frame_counts()
        if frames + bad:
            sink.gate_metric("hardware_bad_frame_ratio", bad / (frames + bad), "higher")

    def _frame_counts(self) -> tuple[int, int]:
        """Return (valid frames, rejected + lost frames) since the pipeline started."""
        with self._lock:
            registry = self._registry
        valid = bad = 0
        if registry is not None:
            for metric in registry.collect():
                for s in metric.samples:
                    if s.name == "shopfleet_hardware_frames_total":
                        valid += int(s.value)
                    elif s.name in ("shopfleet_hardware_frames_rejected_total", "shopfleet_hardware_frames_lost_total"):
                        bad += int(s.value)
        return valid, bad

    def _status(self, status: Any, sink: EventSink) -> None:
        source = status.board or status.port
        if status.state == "connected":
            with self._lock:
                self._detail = f"board {status.board} firmware {status.firmware} on {status.port}"
                was_down, self._disconnected = self._disconnected, False
            if was_down:
                sink.alert("sensor_board_disconnected", "resolved", "warning", source, f"{source} is back on {status.port}")
        else:
            with self._lock:
                self._detail = f"board {status.board} lost: {status.detail}"
                self._disconnected = True
                self._frames_window.clear()
            self._last_gates = 0.0  # report the board's absence (fps 0) now, not at the next interval
            sink.alert(
                "sensor_board_disconnected", "firing", "warning", source,
                f"{source} on {status.port} stopped answering ({status.detail}); check its USB cable",
            )

    def _reading(self, r: Any, sink: EventSink) -> None:
        now = time.monotonic()
        with self._lock:
            if r.channel == 0:
                self._frames_window.append(now)
            key = (r.board, r.channel)
            if not r.ok or now - self._last_sent.get(key, -1e9) < self.config.readings_interval_s:
                return
            self._last_sent[key] = now
        labels = {"board": r.board, "channel": str(r.channel)}
        slot = self._planogram.slot_for(r.board, r.channel) if self._planogram is not None else None
        if slot is not None:  # the dashboard shows the slot and product, not the wiring
            labels.update(slot=slot.slot, product=slot.product)
        if r.kind == "temperature":  # a board's thermometers sit in the fridges (alert rule 'fridge_warm')
            labels["sensor"] = "fridge-thermometer"
        sink.readings([Reading(name=READING_NAMES[r.kind], value=r.value, unit=r.unit, source=f"{r.board}/{r.channel}", labels=labels)])

    def health(self) -> dict[str, Any]:
        """Return frame rate, newest-reading age, lost frames and errors by reason."""
        with self._lock:
            registry, detail = self._registry, self._detail
            now = time.monotonic()
            self._frames_window = [t for t in self._frames_window if now - t <= FPS_WINDOW_S]
            fps = len(self._frames_window) / FPS_WINDOW_S
        out: dict[str, Any] = {"fps": fps, "detail": detail}
        if registry is None:
            return out
        by_reason: dict[str, int] = {}
        lost = 0
        ages = []
        for metric in registry.collect():
            for s in metric.samples:
                if s.name == "shopfleet_hardware_frames_rejected_total":
                    by_reason[s.labels["reason"]] = by_reason.get(s.labels["reason"], 0) + int(s.value)
                elif s.name == "shopfleet_hardware_frames_lost_total":
                    lost += int(s.value)
                elif s.name == "shopfleet_hardware_reconnects_total":
                    by_reason["reconnect"] = by_reason.get("reconnect", 0) + int(s.value)
                elif s.name == "shopfleet_hardware_board_reboots_total":
                    by_reason["board_reboot"] = by_reason.get("board_reboot", 0) + int(s.value)
                elif s.name == "shopfleet_hardware_sensor_errors_total":
                    key = f"sensor_{s.labels['status']}"
                    by_reason[key] = by_reason.get(key, 0) + int(s.value)
                elif s.name == "shopfleet_hardware_last_reading_age_seconds":
                    ages.append(s.value)
        if lost:
            by_reason["frames_lost"] = lost
        out.update(dropped_frames=lost, errors=sum(v for k, v in by_reason.items() if k != "frames_lost"), errors_by_reason=by_reason)
        if ages:
            out["last_frame_age_s"] = max(ages)
        return out




def build(config: Config) -> HardwarePipeline:
    """Make the pipeline for one sensor board."""
    return HardwarePipeline(config)

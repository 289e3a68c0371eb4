"""Per-channel stability detection: when has a shelf's weight settled, and did it change?

A load cell under a shelf slot is noisy (electrical noise, a shopper leaning on the shelf, the
container swaying in the wind) and drifts slowly (temperature, creep). A pick is a step between
two settled levels with a transient in between (the hand presses, then lifts). So the detector
does not look at single readings: a channel is *stable* once every reading of the last
``window_s`` seconds lies within ``tolerance_g`` of each other; its stable value is their mean.
A change is reported when a new stable value differs from the last reported one (the baseline)
by at least ``min_change_g``; smaller differences move the baseline quietly, which is how slow
drift is absorbed without ever being reported as a pick.

The detector is pure state fed with (time, grams) pairs, so it is tested without any I/O.
Trade-offs of each parameter are in :class:`StabilitySettings` and docs/hardware.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StabilitySettings(BaseModel):
    """Tuning of the stability detector, the same for every load-cell channel of a board."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    window_s: float = Field(
        0.8,
        gt=0,
        le=30,
        description="Readings must stay within tolerance_g for this long to count as stable. Longer "
        "rejects slow transients (a hand resting on the shelf) but delays every shelf_change event by as much.",
    )
    tolerance_g: float = Field(
        12.0,
        gt=0,
        description="Largest spread (max - min) of readings within the window that still counts as settled. "
        "Must exceed the channel's noise (about 6 sigma); too large and two quick picks blur into one.",
    )
    min_change_g: float = Field(
        20.0,
        gt=0,
        description="Smallest difference between two stable values reported as a shelf_change. Lower catches "
        "lighter items; it must stay above drift per window and well above the noise, or drift is reported as picks.",
    )
    min_samples: int = Field(
        4, ge=2, le=1000, description="Readings the window must hold before it can be stable (guards against low rates)."
    )

    @model_validator(mode="after")
    def _change_above_tolerance(self) -> StabilitySettings:
        if self.min_change_g <= self.tolerance_g / 2:
            raise ValueError(
                f"min_change_g ({self.min_change_g}) must exceed tolerance_g / 2 ({self.tolerance_g / 2}): "
                "otherwise noise within a settled window can be reported as a change; raise min_change_g"
            )
        return self


@dataclass(frozen=True)
class StableChange:
    """A settled change of a channel's weight from ``before_g`` to ``after_g``."""

    at: float
    before_g: float
    after_g: float

    @property
    def delta_g(self) -> float:
        """Return after minus before (negative: something was taken)."""
        return self.after_g - self.before_g


class StabilityDetector:
    """Follow one channel and report each settled change of its weight."""

    def __init__(self, settings: StabilitySettings) -> None:
        self.settings = settings
        # The window as two parallel deques (times, grams), plus the monotonic deques of its
        # running maximum (non-increasing) and minimum (non-decreasing): the spread is then
        # known in O(1) per reading instead of scanning the window, which at 100 readings/s was
        # most of the serial driver's CPU.
        self._times: deque[float] = deque()
        self._grams: deque[float] = deque()
        self._hi: deque[float] = deque()
        self._lo: deque[float] = deque()
        self.baseline: float | None = None
        self.stable = False

    def reset(self) -> None:
        """Forget the history (after a reconnect or a tare): the next settled value is the new baseline."""
        for d in (self._times, self._grams, self._hi, self._lo):
            d.clear()
        self.baseline = None
        self.stable = False

    def update(self, at: float, grams: float) -> StableChange | None:
        """Add one reading; return a change if the channel just settled at a new level."""
        s = self.settings
        times, values, hi, lo = self._times, self._grams, self._hi, self._lo
        if times and at < times[-1]:
            # the clock went backwards (board reboot): start over, keep the baseline
            for d in (times, values, hi, lo):
                d.clear()
        times.append(at)
        values.append(grams)
        # Only strictly smaller (larger) values leave hi (lo), so equal values stay and the
        # oldest grams leaving the window is at the front of hi (lo) exactly when it is there.
        while hi and hi[-1] < grams:
            hi.pop()
        hi.append(grams)
        while lo and lo[-1] > grams:
            lo.pop()
        lo.append(grams)
        while len(times) > 1 and at - times[1] >= s.window_s:
            times.popleft()
            old = values.popleft()
            if hi[0] == old:
                hi.popleft()
            if lo[0] == old:
                lo.popleft()
        settled = len(times) >= s.min_samples and at - times[0] >= s.window_s and hi[0] - lo[0] <= s.tolerance_g
        self.stable = settled
        if not settled:
            return None
        level = sum(values) / len(values)
        if self.baseline is None:
            self.baseline = level
            return None
        if abs(level - self.baseline) >= s.min_change_g:
            change = StableChange(at, self.baseline, level)
            self.baseline = level
            return change
        # Below the reporting threshold: follow it, so slow drift never accumulates into a "pick".
        self.baseline = level
        return None

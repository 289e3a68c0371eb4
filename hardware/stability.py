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

from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import eq, gt, lt, sub

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
        self._chains_stale = False  # _hi/_lo not rebuilt since a calm block (update_many) moved the window
        self.baseline: float | None = None
        self.stable = False

    def reset(self) -> None:
        """Forget the history (after a reconnect or a tare): the next settled value is the new baseline."""
        for d in (self._times, self._grams, self._hi, self._lo):
            d.clear()
        self._chains_stale = False
        self.baseline = None
        self.stable = False

    def update(self, at: float, grams: float) -> StableChange | None:
        """Add one reading; return a change if the channel just settled at a new level."""
        s = self.settings
        if self._chains_stale:
            self._rebuild_chains()
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

    def update_many(self, times: Sequence[float], grams: Sequence[float]) -> list[tuple[int, StableChange]]:
        """Add readings in order; return (index, change) for each that :meth:`update` would report.

        The result and the state afterwards are exactly those of :meth:`update` called reading by
        reading. The serial driver feeds a whole read of the port per channel at once, and most of
        it is a shelf at rest: a *calm* stretch, whose readings together with the current window lie
        within less than the tolerance and the smallest change (and around the baseline), cannot
        report anything, so it is taken as one block (:meth:`_calm_block`, C-level passes over the
        values) and only the final window, baseline and flag are computed. The rest (a step, a
        transient, a clock going back) goes through the reading-by-reading loop.
        """
        if len(times) != len(grams):
            raise ValueError(f"{len(times)} times but {len(grams)} values")
        out: list[tuple[int, StableChange]] = []
        n = len(times)
        k = 0
        while k < n:
            if n - k >= _MIN_BLOCK:
                taken = self._calm_block(times, grams, k) or self._unsettled_block(times, grams, k)
                if taken:
                    k += taken
                    continue
            # a few one by one, then look again (a failed look costs little: the window's spread is known)
            stop = min(n, k + _MIN_BLOCK)
            out += self._loop(times, grams, k, stop)
            k = stop
        return out

    def _loop(self, times: Sequence[float], grams: Sequence[float], start: int, stop: int) -> list[tuple[int, StableChange]]:
        """Feed times/grams[start:stop] one by one, as :meth:`update` (settings and deques in locals)."""
        s = self.settings
        if self._chains_stale:
            self._rebuild_chains()
        window, tolerance, min_samples, min_change = s.window_s, s.tolerance_g, s.min_samples, s.min_change_g
        times_d, values, hi, lo = self._times, self._grams, self._hi, self._lo
        baseline, stable = self.baseline, self.stable
        out: list[tuple[int, StableChange]] = []
        for k in range(start, stop):
            at, g = times[k], grams[k]
            if times_d and at < times_d[-1]:
                for d in (times_d, values, hi, lo):
                    d.clear()
            times_d.append(at)
            values.append(g)
            while hi and hi[-1] < g:
                hi.pop()
            hi.append(g)
            while lo and lo[-1] > g:
                lo.pop()
            lo.append(g)
            while len(times_d) > 1 and at - times_d[1] >= window:
                times_d.popleft()
                old = values.popleft()
                if hi[0] == old:
                    hi.popleft()
                if lo[0] == old:
                    lo.popleft()
            stable = len(times_d) >= min_samples and at - times_d[0] >= window and hi[0] - lo[0] <= tolerance
            if stable:
                level = sum(values) / len(values)
                if baseline is not None and abs(level - baseline) >= min_change:
                    out.append((k, StableChange(at, baseline, level)))
                baseline = level
        self.baseline, self.stable = baseline, stable
        return out

    def _calm_block(self, times: Sequence[float], grams: Sequence[float], start: int) -> int:
        """Take the calm stretch from start as one block; return how many readings it took (0: none).

        Calm: the current window and the stretch lie in one band narrower than both
        ``tolerance_g`` and ``min_change_g`` (less a margin for rounding), the baseline lies
        within ``min_change_g`` of the whole band, the clock does not go back and the last reading
        of the stretch is settled. Then no reading of the stretch can report a change: each
        window's mean lies in the band, so within less than ``min_change_g`` of the baseline and of
        the previous level. What the stretch leaves is computed directly: the window is what
        evicting with the last reading's time leaves (eviction only ever moves forward), and the
        baseline is its mean, summed in the same order as :meth:`update` sums it. The max/min
        deques are rebuilt from that window only when the reading-by-reading path needs them.
        """
        values_d = self._grams
        if not values_d:
            return 0
        s = self.settings
        if self._chains_stale:
            high, low = max(values_d), min(values_d)
        else:
            high, low = self._hi[0], self._lo[0]
        margin = 1e-9 * (abs(high) + abs(low) + 1.0)
        limit = min(s.tolerance_g, s.min_change_g) - margin
        slack = (limit - (high - low)) / 2
        if slack < 0:
            return 0  # the window itself is not calm (a step or a transient in it)
        band_low, band_high = low - slack, high + slack
        baseline = self.baseline
        if baseline is not None and max(band_high - baseline, baseline - band_low) >= s.min_change_g - margin:
            return 0  # a settled level in the band could be a change from the baseline
        rest = list(grams[start:])
        taken = len(rest)
        if max(rest) > band_high or min(rest) < band_low:  # calm up to the first value outside the band
            outside = list(map(gt, rest, repeat(band_high)))
            below = list(map(lt, rest, repeat(band_low)))
            taken = min(outside.index(True) if True in outside else taken, below.index(True) if True in below else taken)
        if taken < _MIN_BLOCK:
            return 0
        times_d = self._times
        new_times = list(times[start : start + taken])
        if new_times[0] < times_d[-1] or new_times != sorted(new_times):
            return 0  # the clock went back (a reboot): the loop restarts the window there
        all_times = list(times_d) + new_times
        at = new_times[-1]
        last = len(all_times) - 1
        # eviction drops the front while the next one is at least a window old (monotone in the index)
        front = bisect_left(range(last), True, key=lambda i: at - all_times[i + 1] < s.window_s)
        if last + 1 - front < s.min_samples or at - all_times[front] < s.window_s:
            return 0  # the stretch would end unsettled: let the loop follow it
        all_values = list(values_d) + rest[:taken]
        times_d.clear()
        times_d.extend(all_times[front:])
        values_d.clear()
        values_d.extend(all_values[front:])
        self._chains_stale = True
        self.baseline = sum(values_d) / len(values_d)
        self.stable = True
        return taken

    def _unsettled_block(self, times: Sequence[float], grams: Sequence[float], start: int) -> int:
        """Take the stretch from start that cannot settle as one block; return how many readings it took (0: none).

        After a step the window holds both levels: while its newest value and an older one more
        than ``tolerance_g`` apart are both in it, no reading is settled (the spread, max - min,
        is at least their difference), so none reports a change or moves the baseline. The older
        one (the last such in the window) leaves when a reading comes a window after its
        successor; every reading before that (with the clock not going back) is taken as a block:
        the window is what evicting with the last one's time leaves, and the flag is False.
        """
        values_d, times_d = self._grams, self._times
        if len(values_d) < 2:
            return 0
        s = self.settings
        newest = values_d[-1]
        above = list(map(gt, map(sub, values_d, repeat(newest)), repeat(s.tolerance_g)))
        below = list(map(gt, map(sub, repeat(newest), values_d), repeat(s.tolerance_g)))
        last = len(values_d) - 1
        far = max(last - above[::-1].index(True) if True in above else -1, last - below[::-1].index(True) if True in below else -1)
        if far < 0:
            return 0  # the window could settle with the next reading: nothing to skip
        new_times = list(times[start:])
        if new_times[0] < times_d[-1] or new_times != sorted(new_times):
            return 0  # the clock went back (a reboot): the loop restarts the window there
        leaves = times_d[far + 1]
        window = s.window_s
        # the first reading that evicts the far value (and could settle again) ends the block
        taken = bisect_left(new_times, True, key=lambda at: at - leaves >= window)
        if taken < _MIN_BLOCK:
            return 0
        new_times = new_times[:taken]
        all_times = list(times_d) + new_times
        at = new_times[-1]
        end = len(all_times) - 1
        front = bisect_left(range(end), True, key=lambda i: at - all_times[i + 1] < window)
        all_values = list(values_d)
        all_values += grams[start : start + taken]
        times_d.clear()
        times_d.extend(all_times[front:])
        values_d.clear()
        values_d.extend(all_values[front:])
        self._chains_stale = True
        self.stable = False
        return taken

    def _rebuild_chains(self) -> None:
        """Rebuild the running max/min deques from the window (after a block left them stale).

        The max deque holds, in order, every value no later value exceeds (what pushing the
        window's values one by one leaves): the values equal to the maximum of themselves and
        all later ones, found with running maxima from the end (C-level passes). Min likewise.
        """
        values = list(self._grams)
        rev = values[::-1]
        suffix_max = list(accumulate(rev, max))
        suffix_max.reverse()
        suffix_min = list(accumulate(rev, min))
        suffix_min.reverse()
        self._hi.clear()
        self._hi.extend(compress(values, map(eq, values, suffix_max)))
        self._lo.clear()
        self._lo.extend(compress(values, map(eq, values, suffix_min)))
        self._chains_stale = False


_MIN_BLOCK = 8
"""Fewest readings worth taking as a calm block (a board at its normal rate sends one per read)."""

"""The stability detector's O(1) window (monotonic max/min deques) against the plain definition.

The detector keeps the running maximum and minimum of its window incrementally so a reading
costs the same however many the window holds (the serial driver's CPU per frame depends on
it). Here a direct implementation of the definition in hardware/stability.py (every reading
of the last window_s seconds, spread = max - min, level = mean) is fed the same readings,
including repeated values, clock jumps backwards and resets, and must agree on every result.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.stability import StabilityDetector, StabilitySettings, StableChange


class Reference:
    """The detector's definition, scanning the whole window on every reading."""

    def __init__(self, s: StabilitySettings) -> None:
        self.s = s
        self.window: list[tuple[float, float]] = []
        self.baseline: float | None = None
        self.stable = False

    def reset(self) -> None:
        self.window = []
        self.baseline = None
        self.stable = False

    def update(self, at: float, grams: float) -> StableChange | None:
        s, w = self.s, self.window
        if w and at < w[-1][0]:
            w.clear()
        w.append((at, grams))
        while len(w) > 1 and at - w[1][0] >= s.window_s:
            w.pop(0)
        values = [g for _, g in w]
        self.stable = len(w) >= s.min_samples and at - w[0][0] >= s.window_s and max(values) - min(values) <= s.tolerance_g
        if not self.stable:
            return None
        level = sum(values) / len(values)
        if self.baseline is not None and abs(level - self.baseline) >= s.min_change_g:
            change = StableChange(at, self.baseline, level)
            self.baseline = level
            return change
        self.baseline = level
        return None


# Steps: (time step in s, negative = the clock went back; grams from a small set so values
# repeat exactly; True = reset before this reading).
steps = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([0.01, 0.05, 0.1, 0.3]), st.floats(-2.0, 1.0, allow_nan=False)),
        st.one_of(st.sampled_from([0.0, 5.0, 5.0, 10.0, 345.0, 350.0, 690.0]), st.floats(-1000, 1000, allow_nan=False)),
        st.integers(0, 19).map(lambda n: n == 0),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(
    steps=steps,
    window_s=st.sampled_from([0.05, 0.2, 0.8]),
    tolerance_g=st.sampled_from([0.5, 12.0, 200.0]),
    min_samples=st.integers(2, 6),
)
def test_incremental_window_matches_the_definition(steps, window_s: float, tolerance_g: float, min_samples: int) -> None:
    s = StabilitySettings(window_s=window_s, tolerance_g=tolerance_g, min_change_g=tolerance_g, min_samples=min_samples)
    fast, ref = StabilityDetector(s), Reference(s)
    at = 0.0
    for i, (dt, grams, reset) in enumerate(steps):
        if reset:
            fast.reset()
            ref.reset()
        at += dt
        assert fast.update(at, grams) == ref.update(at, grams), f"step {i}"
        assert fast.stable == ref.stable, f"step {i}"
        assert fast.baseline == ref.baseline, f"step {i}"


def test_a_long_window_settles_on_a_step_like_the_definition() -> None:
    """A 100-readings/s channel with a 0.8 s window (80 readings): a pick is found once, at the same time."""
    s = StabilitySettings()
    fast, ref = StabilityDetector(s), Reference(s)
    got = []
    for i in range(600):
        grams = (3450.0 if i < 300 else 3105.0) + (i * 7919) % 31 / 10
        a, b = fast.update(i / 100, grams), ref.update(i / 100, grams)
        assert a == b
        if a:
            got.append(a)
    assert len(got) == 1 and round(got[0].delta_g) == -345

"""Stability detection, shelf events, door edges, temperature hysteresis and the planogram."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware.events import (
    BoardProcessor,
    DoorEvent,
    Reading,
    ShelfEvent,
    TemperatureAlert,
    TemperatureSettings,
)
from hardware.planogram import Planogram, PlanogramError, Slot, estimate_quantity, load_planogram
from hardware.stability import StabilitySettings

RATE_HZ = 10
NOISE_G = 2.0


def shelf_signal(start_g: float, changes: list[tuple[float, float]], end_s: float, seed: int, drift_g_per_s: float = 0.0):
    """Yield (t, grams) at 10 Hz: steps at the given times with a 0.4 s hand transient, noise and drift."""
    rng = random.Random(seed)
    level, prev, changed_at = start_g, start_g, -10.0
    pending = sorted(changes)
    for i in range(int(end_s * RATE_HZ)):
        t = i / RATE_HZ
        while pending and pending[0][0] <= t:
            prev, changed_at = level, pending[0][0]
            level += pending.pop(0)[1]
        dt = t - changed_at
        if dt < 0.4:
            step = level - prev
            value = prev + step * dt / 0.4 + 0.3 * abs(step) * math.sin(math.pi * dt / 0.4)
        else:
            value = level
        yield t, value + drift_g_per_s * t + rng.gauss(0, NOISE_G)


def run(processor: BoardProcessor, signal, channel: int = 0) -> list:
    events = []
    for t, g in signal:
        events += processor.feed(Reading("b1", channel, "load_cell", g, "g", at=1000 + t, board_time=t))
    return events


PLANOGRAM = Planogram(
    slots=(
        Slot(board="b1", channel=0, slot="A1", product="cola-330", unit_weight_g=345, unit_weight_sd_g=3),
        Slot(board="b1", channel=1, slot="A2", product="choc-50", unit_weight_g=50, unit_weight_sd_g=1),
    )
)


def processor() -> BoardProcessor:
    return BoardProcessor("b1", PLANOGRAM, StabilitySettings(), TemperatureSettings(), noise_g=NOISE_G)


@pytest.mark.parametrize("seed", range(5), ids=lambda s: f"seed{s}")
@pytest.mark.parametrize(
    ("channel", "unit", "counts"),
    [
        pytest.param(0, 345, [-1], id="pick-1-can"),
        pytest.param(0, 345, [-3], id="pick-3-cans"),
        pytest.param(0, 345, [1], id="put-back-1-can"),
        pytest.param(0, 345, [3], id="put-back-3-cans"),
        pytest.param(1, 50, [-1, -3, 3, 1], id="bars-pick-1-pick-3-back-3-back-1"),
        pytest.param(0, 345, [-3, 1, -1, 3], id="cans-mixed"),
    ],
)
def test_picks_and_put_backs_on_a_noisy_channel_give_exactly_the_right_events(seed: int, channel: int, unit: float, counts: list[int]) -> None:
    changes = [(2.0 + 2.5 * i, c * unit) for i, c in enumerate(counts)]
    events = run(processor(), shelf_signal(20 * unit, changes, 4.0 + 2.5 * len(counts), seed), channel)
    assert [e.quantity for e in events] == counts
    slot = PLANOGRAM.slot_for("b1", channel)
    for e, c in zip(events, counts, strict=False):
        assert isinstance(e, ShelfEvent) and e.slot == slot.slot and e.product == slot.product
        assert abs(e.delta_g - c * unit) < 5
        assert e.confidence > 0.9


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.sampled_from([-3, -2, -1, 1, 2, 3]), min_size=1, max_size=5),
    gap=st.floats(1.8, 4.0),
    seed=st.integers(0, 10_000),
)
def test_any_sequence_of_picks_and_put_backs_is_reported_exactly(counts: list[int], gap: float, seed: int) -> None:
    changes = [(2.0 + gap * i, c * 345.0) for i, c in enumerate(counts)]
    events = run(processor(), shelf_signal(20 * 345.0, changes, 3.0 + gap * len(counts), seed))
    assert [e.quantity for e in events] == counts


def test_slow_drift_is_never_reported_as_a_pick() -> None:
    # 0.5 g/s for two minutes: 60 g in total, more than min_change_g, but never a settled step.
    events = run(processor(), shelf_signal(3450, [], 120, seed=3, drift_g_per_s=0.5))
    assert events == []


def test_a_pick_during_drift_is_still_exact() -> None:
    events = run(processor(), shelf_signal(3450, [(30.0, -345.0)], 60, seed=4, drift_g_per_s=-0.3))
    assert [e.quantity for e in events] == [-1]


def test_an_unknown_object_gets_quantity_zero_and_no_confidence() -> None:
    events = run(processor(), shelf_signal(3450, [(2.0, -170.0)], 5, seed=5))
    assert len(events) == 1 and events[0].quantity == 0 and events[0].confidence == 0.0


def test_channel_without_a_slot_reports_grams_only() -> None:
    events = run(processor(), shelf_signal(1000, [(2.0, -300.0)], 5, seed=6), channel=7)
    assert len(events) == 1 and events[0].slot == "b1/7" and events[0].product == "" and abs(events[0].delta_g + 300) < 5


@pytest.mark.parametrize(
    ("delta", "unit", "sd", "quantity", "min_conf", "max_conf"),
    [
        pytest.param(-345, 345, 0, -1, 1.0, 1.0, id="exact-one"),
        pytest.param(-1035, 345, 3, -3, 1.0, 1.0, id="exact-three"),
        pytest.param(-1045, 345, 3, -3, 0.9, 1.0, id="three-within-spread"),
        pytest.param(-517.5, 345, 0, -2, 0.0, 0.05, id="halfway-between"),
        pytest.param(100, 345, 0, 0, 0.0, 0.0, id="not-a-unit"),
    ],
)
def test_quantity_estimate(delta, unit, sd, quantity, min_conf, max_conf) -> None:
    est = estimate_quantity(delta, unit, sd, noise_g=2.0)
    assert est.quantity == quantity
    assert min_conf <= est.confidence <= max_conf


@settings(max_examples=200)
@given(delta=st.floats(-1e5, 1e5), unit=st.floats(1, 5000), sd=st.floats(0, 50))
def test_quantity_confidence_is_always_within_0_and_1(delta: float, unit: float, sd: float) -> None:
    est = estimate_quantity(delta, unit, sd, 2.0)
    assert 0.0 <= est.confidence <= 1.0


def test_door_edges_only_on_change() -> None:
    p = processor()
    out = []
    for t, v in enumerate([0, 0, 1, 1, 1, 0, 0, 1]):
        out += p.feed(Reading("b1", 2, "door", v, "state", at=t, board_time=t))
    assert out == [DoorEvent("b1", 2, "door_opened", 2), DoorEvent("b1", 2, "door_closed", 5), DoorEvent("b1", 2, "door_opened", 7)]


def test_temperature_alert_fires_once_and_resolves_with_hysteresis() -> None:
    p = processor()  # high 8.0, hysteresis 1.0
    values = [4.0, 7.9, 8.1, 8.5, 7.8, 7.5, 8.2, 6.9, 6.5, 8.05]
    out = []
    for t, v in enumerate(values):
        out += p.feed(Reading("b1", 3, "temperature", v, "C", at=t, board_time=t))
    assert [(a.state, a.at) for a in out] == [("firing", 2), ("resolved", 7), ("firing", 9)]
    assert all(isinstance(a, TemperatureAlert) and a.name == "temperature_high" for a in out)


def test_readings_with_a_bad_status_are_ignored() -> None:
    p = processor()
    assert p.feed(Reading("b1", 3, "temperature", 99.0, "C", at=0, ok=False)) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"tolerance_g": 50, "min_change_g": 20}, "min_change_g", id="change-below-noise"),
        pytest.param({"window_s": 0}, "window_s", id="zero-window"),
        pytest.param({"bogus": 1}, "bogus", id="unknown-key"),
    ],
)
def test_stability_settings_reject_bad_values(kwargs, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StabilitySettings(**kwargs)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("slots: [{board: b, channel: 0, slot: A1, product: p}]", r"slots\.0\.unit_weight_g", id="missing-unit-weight"),
        pytest.param(
            "slots: [{board: b, channel: 0, slot: A1, product: p, unit_weight_g: 5},"
            " {board: b, channel: 0, slot: A2, product: q, unit_weight_g: 5}]",
            "channel 0 is used by slots",
            id="two-slots-one-channel",
        ),
        pytest.param("slots: [{board: b, channel: 0, slot: A1, product: p, unit_weight_g: 5, colour: red}]", "colour", id="unknown-key"),
        pytest.param("slots: [", "not valid YAML", id="bad-yaml"),
    ],
)
def test_planogram_errors_name_file_and_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "planogram.yaml"
    path.write_text(text)
    with pytest.raises(PlanogramError, match=match) as info:
        load_planogram(path)
    assert str(path) in str(info.value)


def test_planogram_loads(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("slots:\n  - {board: shelf-1, channel: 1, slot: B2, product: choc-50, unit_weight_g: 50}\n")
    assert load_planogram(path).slot_for("shelf-1", 1).product == "choc-50"

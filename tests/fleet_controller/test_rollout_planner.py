"""Pure parts of rollouts as tables: policy validation, the planner, health gates, windows."""

from __future__ import annotations

import contextlib
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_controller.rollout.gates import NodeHealth, ReadingValue, evaluate_gates, window_open
from fleet_controller.rollout.planner import FleetShop, plan_rollout
from fleet_controller.rollout.policy import (
    Gates,
    PolicyError,
    RolloutPolicy,
    Windows,
    load_policy,
    policy_from_dict,
)


def fleet(n: int = 20) -> list[FleetShop]:
    return [
        FleetShop(
            id=f"shop-{i:02d}",
            region="north" if i % 2 else "south",
            labels={"tier": "flagship" if i < 3 else "standard"},
            node_classes=frozenset({"pi", "gpu"} if i % 3 == 0 else {"pi"}),
            release="r1",
        )
        for i in range(n)
    ]


def P(**kw) -> RolloutPolicy:
    return policy_from_dict(kw)


PLANS = [
    pytest.param(fleet(), P(), [20], 0, id="default-one-wave"),
    pytest.param(fleet(), P(waves=[{"name": "canary", "shops": ["shop-05"]}, {"name": "rest", "percent": 100}]), [1, 19], 0, id="named-canary"),
    pytest.param(fleet(), P(waves=[{"name": "c", "percent": 10}, {"name": "half", "percent": 50}, {"name": "all", "percent": 100}]), [2, 8, 10], 0, id="cumulative-percentages"),
    pytest.param(fleet(), P(waves=[{"name": "flag", "labels": {"tier": "flagship"}}, {"name": "all", "percent": 100}]), [3, 17], 0, id="label-wave"),
    pytest.param(fleet(), P(target={"regions": ["north"]}), [10], 10, id="target-region"),
    pytest.param(fleet(), P(target={"node_classes": ["gpu"]}), [7], 13, id="target-node-class"),
    pytest.param(fleet(), P(target={"labels": {"tier": "standard"}, "exclude": ["shop-10"]}), [16], 4, id="target-label-and-exclude"),
    pytest.param(fleet(), P(waves=[{"name": "c", "shops": ["shop-99"]}, {"name": "all", "percent": 100}]), [20], 1, id="unknown-canary-skipped"),
    pytest.param([], P(), [], 0, id="empty-fleet"),
    pytest.param(fleet(3), P(waves=[{"name": "c", "percent": 1}, {"name": "all", "percent": 100}]), [1, 2], 0, id="tiny-fleet-rounds-up"),
]


@pytest.mark.parametrize("shops, policy, sizes, skipped", PLANS)
def test_plan_table(shops, policy, sizes, skipped):
    plan = plan_rollout(shops, "r2", policy)
    assert [len(w.shops) for w in plan.waves] == sizes
    assert len(plan.skipped) == skipped
    assert len(set(plan.shops)) == len(plan.shops)


def test_plan_skips_shops_already_on_the_release_and_is_deterministic():
    shops = fleet()
    shops[4] = FleetShop(id="shop-04", release="r2")
    policy = P(waves=[{"name": "c", "percent": 25}, {"name": "all", "percent": 100}])
    a, b = plan_rollout(shops, "r2", policy), plan_rollout(list(reversed(shops)), "r2", policy)
    assert a == b
    assert ("shop-04", "already on this release") in a.skipped
    assert plan_rollout(shops, "r3", policy).waves[0].shops != a.waves[0].shops  # order differs per release
    assert a.to_json() == type(a).from_json(a.to_json()).to_json()


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 60), cuts=st.lists(st.floats(1, 99), max_size=4), canary=st.integers(0, 70))
def test_plan_covers_every_targeted_shop_exactly_once(n, cuts, canary):
    waves = [{"name": "canary", "shops": [f"shop-{canary:02d}"]}]
    waves += [{"name": f"w{i}", "percent": c} for i, c in enumerate(sorted(cuts))]
    waves.append({"name": "all", "percent": 100})
    plan = plan_rollout(fleet(n), "r2", P(waves=waves))
    assert sorted(plan.shops) == sorted(s.id for s in fleet(n))
    if canary < n:
        assert plan.waves[0].shops == (f"shop-{canary:02d}",)


POLICY_ERRORS = [
    pytest.param({"waves": [{"name": "a", "percent": 50}]}, "last wave must have percent: 100", id="last-wave-not-100"),
    pytest.param({"waves": [{"name": "a", "percent": 60}, {"name": "b", "percent": 30}, {"name": "c", "percent": 100}]}, "cumulative", id="percent-decreases"),
    pytest.param({"waves": [{"name": "a"}, {"name": "b", "percent": 100}]}, "selects no shop", id="empty-wave"),
    pytest.param({"waves": [{"name": "a", "percent": 100}, {"name": "a", "percent": 100}]}, "repeat", id="duplicate-names"),
    pytest.param({"bake_time_s": 600, "deadline_s": 60}, "shorter than bake_time_s", id="deadline-before-bake"),
    pytest.param({"bake_tme_s": 5}, "bake_tme_s: unknown key", id="typo-key"),
    pytest.param({"windows": {"local": [{"start": "25:00", "end": "03:00"}]}}, "HH:MM", id="bad-time"),
    pytest.param({"gates": {"metrics": [{"metric": "cart_review_rate"}]}}, "no bound", id="metric-gate-without-bound"),
    pytest.param({"max_in_flight": 0}, "max_in_flight", id="zero-in-flight"),
]


@pytest.mark.parametrize("data, message", POLICY_ERRORS)
def test_policy_errors_name_key_and_fix(data, message):
    with pytest.raises(PolicyError, match="policy.yaml") as exc:
        policy_from_dict(data, "policy.yaml")
    assert message in str(exc.value)


def test_load_policy_file_errors(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("- a list\n")
    with pytest.raises(PolicyError, match="must be a mapping"):
        load_policy(f)
    f.write_text("waves: [\n")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(f)
    f.write_text("bake_time_s: 5\nwaves: [{name: c, shops: [a]}, {name: all, percent: 100}]\n")
    assert load_policy(f).bake_time_s == 5
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["waves", "bake_time_s", "gates", "target", "x", "max_in_flight"]),
                       st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=5), st.lists(st.integers(), max_size=2)), max_size=4))
def test_policy_parser_is_total(data):
    with contextlib.suppress(PolicyError):
        policy_from_dict(data)


def node(presence="online", facts_at=100.0, fps=15.0, errors=0, state="running", **metrics) -> NodeHealth:
    return NodeHealth("n1", presence, facts_at, {"cam-0": {"kind": "vision", "state": state, "fps": fps, "errors": errors}}, metrics)


G = Gates(offline_grace_s=60, min_fps=5, max_errors_per_minute=10, metrics=({"metric": "cart_review_rate", "max": 0.1},))
BASE = {"errors": 0.0, "at": 100.0}

GATES = [
    pytest.param([], {}, "wait", "", id="no-nodes-yet"),
    pytest.param([node(facts_at=50)], {}, "wait", "", id="heartbeat-from-before-apply"),
    pytest.param([node()], {}, "pass", "", id="first-fresh-sets-baseline"),
    pytest.param([node(), node(presence="offline")], BASE, "wait", "", id="node-offline-within-grace"),
    pytest.param([node(), node(presence="offline")], {**BASE, "offline_since": 10.0}, "fail", "nodes_online", id="node-offline-past-grace"),
    pytest.param([node(fps=2.0)], BASE, "fail", "fps", id="fps-low"),
    pytest.param([node(state="backoff")], BASE, "fail", "pipeline_state", id="pipeline-backoff"),
    pytest.param([node(errors=30)], BASE, "fail", "error_rate", id="errors-per-minute"),
    pytest.param([node(errors=1)], BASE, "pass", "", id="few-errors-ok"),
    pytest.param([node(cart_review_rate=0.3)], BASE, "fail", "metric", id="metric-above-max"),
    pytest.param([node(cart_review_rate=0.02)], BASE, "pass", "", id="metric-ok"),
]


@pytest.mark.parametrize("nodes, baseline, state, gate", GATES)
def test_gates_table(nodes, baseline, state, gate):
    v = evaluate_gates(G, nodes, applied_at=90.0, baseline=baseline, now=160.0)
    assert (v.state, v.gate) == (state, gate), v.reason
    if state == "pass":
        assert v.baseline


def at(hh: int, mm: int, tz: str) -> float:
    return datetime(2026, 11, 27, hh, mm, tzinfo=ZoneInfo(tz)).timestamp()


NIGHT = Windows(local=({"start": "23:00", "end": "05:00"},))
IDLE = Windows(idle={"max_age_s": 60})
EITHER = Windows(local=({"start": "02:00", "end": "04:00"},), idle={"max_age_s": 60})


def r(name, value, age=5.0, now=None):
    return ReadingValue(name, value, (now or 0) - age)


WINDOWS = [
    pytest.param(Windows(), "UTC", at(12, 0, "UTC"), [], True, id="no-window-always-open"),
    pytest.param(NIGHT, "Europe/Berlin", at(23, 30, "Europe/Berlin"), [], True, id="night-before-midnight"),
    pytest.param(NIGHT, "Europe/Berlin", at(4, 59, "Europe/Berlin"), [], True, id="night-after-midnight"),
    pytest.param(NIGHT, "Europe/Berlin", at(12, 0, "Europe/Berlin"), [], False, id="noon-closed"),
    pytest.param(NIGHT, "America/New_York", at(23, 30, "Europe/Berlin"), [], False, id="shop-local-time-not-controller"),
    pytest.param(NIGHT, "Not/AZone", at(23, 30, "UTC"), [], True, id="unknown-zone-uses-utc"),
]


@pytest.mark.parametrize("windows, tz, now, readings, expected", WINDOWS)
def test_local_windows_table(windows, tz, now, readings, expected):
    assert window_open(windows, tz, readings, now)[0] is expected


NOW = 1000.0
IDLES = [
    pytest.param(IDLE, [r("occupancy", 0, now=NOW), r("door_open", 0, now=NOW)], True, id="empty-and-closed"),
    pytest.param(IDLE, [r("occupancy", 1, now=NOW), r("door_open", 0, now=NOW)], False, id="shopper-inside"),
    pytest.param(IDLE, [r("occupancy", 0, now=NOW), r("door_open", 1, now=NOW)], False, id="door-open"),
    pytest.param(IDLE, [r("occupancy", 0, age=300, now=NOW), r("door_open", 0, now=NOW)], False, id="stale-occupancy"),
    pytest.param(IDLE, [], False, id="silent-shop-is-not-idle"),
    pytest.param(EITHER, [r("occupancy", 0, now=NOW), r("door_open", 0, now=NOW)], True, id="idle-outside-local-window"),
]


@pytest.mark.parametrize("windows, readings, expected", IDLES)
def test_idle_windows_table(windows, readings, expected):
    ok, why = window_open(windows, "UTC", readings, NOW)
    assert ok is expected and why

"""The executor step by step on a fake clock, on SQLite and PostgreSQL: waves, gates, rollback,
timeouts, windows, operator actions, and one leader among several executors sharing a database.

Health reaches the executor the way it does in production: as protocol messages written by the
real registry; desired states are captured at the publish seam and parsed and verified as an
agent would.
"""

from __future__ import annotations

import pytest

from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.store import (
    RolloutError,
    request_action,
    rollout_status,
    start_rollout,
)
from tests.support.rollout import FACTS, SHOPS, T0, Harness, spec  # noqa: F401 - T0 and FACTS are used by some tests


@pytest.fixture
def h(db_url, tmp_path) -> Harness:
    harness = Harness(db_url, tmp_path)
    yield harness
    harness.engine.dispose()


def test_waves_in_order_with_bake_time_then_completed(h: Harness):
    rid = h.start("r1")
    h.tick()
    assert h.shops_published() == ["s-a"]  # the canary alone
    topic, state, retain = h.published[0]
    assert topic == "fleet/v1/s-a/state/desired" and retain and state.revision == 1 and state.release == "r1"
    assert h.state(rid, "s-a") == "applying"
    h.report("s-a")
    h.tick(1)
    assert h.state(rid, "s-a") == "baking"
    h.tick(30)
    assert h.state(rid, "s-a") == "baking"  # no heartbeat since the apply: no evidence yet
    h.heartbeat("s-a")
    h.tick(1)
    h.heartbeat("s-a")
    h.tick(40)
    assert h.state(rid, "s-a") == "done" and h.shops_published() == ["s-a"]
    h.tick()  # wave advances
    h.tick()
    assert sorted(h.shops_published()[1:]) == ["s-b", "s-c", "s-d"]
    h.bake(["s-b", "s-c", "s-d"], rid)
    h.tick()
    st = rollout_status(h.engine, rid)
    assert st["status"] == "completed" and [w["done"] for w in st["waves"]] == [1, 3]
    assert [e["kind"] for e in st["events"]].count("rollout") == 4


@pytest.mark.parametrize(
    "hb, gate",
    [
        pytest.param({"fps": 1.0}, "fps", id="fps"),
        pytest.param({"cart_review_rate": 0.4}, "metric", id="cart-review-rate"),
    ],
)
def test_failing_gate_rolls_the_wave_back_and_halts(h: Harness, hb, gate):
    first = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=10)
    h.tick()
    h.bake(SHOPS, first)
    h.tick()
    assert rollout_status(h.engine, first)["status"] == "completed"
    n = len(h.published)
    rid = h.start("r2", gates={"metrics": [{"metric": "cart_review_rate", "max": 0.1}]})
    h.tick()
    h.report("s-a")
    h.tick(1)
    h.heartbeat("s-a", **hb)
    h.tick(1)
    assert h.state(rid, "s-a") == "rolling_back"
    st = rollout_status(h.engine, rid)
    assert st["status"] == "rolling_back" and f"gate {gate}" in st["reason"]
    back = h.last("s-a")
    assert back.release == "r1" and back.revision == 3  # r1 was 1, r2 was 2
    h.report("s-a")
    h.tick(1)
    assert h.state(rid, "s-a") == "rolled_back"
    assert {h.state(rid, s) for s in SHOPS[1:]} == {"skipped"}
    h.tick(1)
    assert rollout_status(h.engine, rid)["status"] == "failed"
    assert set(h.shops_published()[n:]) == {"s-a"}  # nobody outside the canary was touched
    assert h.executors[0].metrics.gate_failures.labels(gate)._value.get() == 1


def test_failed_apply_rolls_back_every_shop_of_the_wave(h: Harness):
    first = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=10)
    h.tick()
    h.bake(SHOPS, first)
    h.tick()
    rid = h.start("r2", waves=[{"name": "all", "percent": 100}], max_in_flight=2)
    n = len(h.published)
    h.tick()
    a, b = h.shops_published()[n:]
    h.report(a, status="failed")
    h.tick(1)
    assert {h.state(rid, a), h.state(rid, b)} == {"rolling_back"}  # b is in the failed wave too
    assert "shop reported failed" in rollout_status(h.engine, rid)["reason"]
    assert sorted((s.shop, s.release) for _, s, _ in h.published[n + 2:]) == sorted([(a, "r1"), (b, "r1")])
    # b never confirms its rollback: after apply_timeout it is failed, and the rollout ends.
    h.report(a)
    h.tick(1)
    h.tick(200)
    h.tick(1)
    assert h.state(rid, a) == "rolled_back" and h.state(rid, b) == "failed"
    st = rollout_status(h.engine, rid)
    assert st["status"] == "failed" and any("rollback not confirmed" in p["reason"] for p in st["problem_shops"])


def test_shop_without_a_previous_release_cannot_be_rolled_back_and_says_so(h: Harness):
    rid = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=1)
    h.tick()
    shop = h.shops_published()[0]
    h.report(shop, status="failed")
    h.tick(1)
    assert h.state(rid, shop) == "failed"
    assert "no previous release to return to; still on r1" in rollout_status(h.engine, rid)["problem_shops"][0]["reason"]


def test_apply_timeout(h: Harness):
    rid = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=1, apply_timeout_s=100)
    h.tick()
    shop = h.shops_published()[0]
    h.tick(50)
    assert h.state(rid, shop) == "applying"
    h.tick(51)
    assert h.state(rid, shop) in ("failed", "rolling_back")
    assert "no apply report within 100s" in " ".join(e["message"] for e in rollout_status(h.engine, rid)["events"])


def test_republish_when_a_shop_stays_silent(h: Harness):
    h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=1)
    h.tick()
    first = h.published[-1][1]
    h.tick(31)
    again = h.published[-1][1]
    assert again.shop == first.shop and again.revision == first.revision and len(h.published) == 2


def test_windows_hold_shops_until_they_open(h: Harness):
    # T0 is 15:33 in Berlin: a 02:00-04:00 window is closed.
    rid = h.start("r1", waves=[{"name": "all", "percent": 100}], windows={"local": [{"start": "02:00", "end": "04:00"}]})
    h.tick()
    assert h.published == []
    h.tick(11 * 3600)  # 02:33 Berlin
    assert len(h.published) == 4
    assert all(e["message"] == "revision 1: r1" for e in rollout_status(h.engine, rid)["events"] if e["kind"] == "rollout")


def test_deadline_stops_starting_shops(h: Harness):
    rid = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=1, deadline_s=100, bake_time_s=50,
                  windows={"local": [{"start": "02:00", "end": "04:00"}]})
    h.tick()
    h.tick(101)
    assert h.published == []
    st = rollout_status(h.engine, rid)
    assert st["status"] == "expired" and st["waves"][0]["states"] == {"skipped": 4}


def test_operator_actions_follow_the_state_machine(h: Harness):
    rid = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=1)
    with pytest.raises(RolloutError, match="'resume' needs it to be paused"):
        request_action(h.engine, rid, "resume")
    assert request_action(h.engine, rid, "pause", "looking at a dashboard")["status"] == "paused"
    h.tick()
    assert h.published == []  # paused: nothing starts
    assert request_action(h.engine, rid, "resume")["status"] == "running"
    h.tick()
    assert len(h.published) == 1
    with pytest.raises(RolloutError, match="still active"):
        start_rollout(h.engine, "r2", policy_from_dict({}))
    st = request_action(h.engine, rid, "abort", "wrong release")
    assert st["status"] == "aborted" and st["waves"][0]["states"]["skipped"] == 3
    with pytest.raises(RolloutError, match="unknown action"):
        request_action(h.engine, rid, "explode")


def test_manual_rollback_returns_touched_shops_to_their_previous_release(h: Harness):
    first = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=10)
    h.tick()
    h.bake(SHOPS, first)
    h.tick()
    rid = h.start("r2", waves=[{"name": "all", "percent": 100}], max_in_flight=10)
    h.tick()
    h.bake(SHOPS, rid)
    h.tick()
    assert rollout_status(h.engine, rid)["status"] == "completed"
    n = len(h.published)
    assert request_action(h.engine, rid, "rollback", "cart review rate creeping up")["status"] == "rolling_back"
    h.tick()
    assert sorted(s.shop for _, s, _ in h.published[n:]) == SHOPS and {s.release for _, s, _ in h.published[n:]} == {"r1"}
    for s in SHOPS:
        h.report(s)
    h.tick(1)
    h.tick(1)
    st = rollout_status(h.engine, rid)
    assert st["status"] == "rolled_back" and st["waves"][0]["states"] == {"rolled_back": 4}


def test_one_executor_per_database_and_takeover_resumes(h: Harness):
    h.executors.append(h.executor("ctl-b"))
    h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=2)
    assert h.tick(executor=0) is True
    assert h.tick(executor=1) is False  # the lease is held
    assert len(h.published) == 2
    h.tick(5, executor=1)
    assert len(h.published) == 2
    # ctl-a dies without releasing its lease; after the TTL ctl-b takes over and re-publishes in-flight shops.
    assert h.tick(11, executor=1) is True
    assert len(h.published) == 4 and {s.revision for _, s, _ in h.published[2:]} == {1}
    assert h.tick(executor=0) is False
    assert h.executors[1].metrics.leader._value.get() == 1


def test_start_refuses_a_shop_whose_overlay_does_not_exist(h: Harness):
    h.registry.register_shop("s-b", labels={"manifests-overlay": "nope"})
    with pytest.raises(RolloutError, match="s-b .label manifests-overlay=nope.: unknown edge overlay 'nope'"):
        h.start("r1")
    assert h.published == []


def test_two_executors_ticking_at_once_publish_each_shop_once(h: Harness):
    """Both controllers tick concurrently, and the lease changes hands mid-rollout: still one revision per shop."""
    import threading

    h.executors.append(h.executor("ctl-b"))
    h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=4)
    errors: list[BaseException] = []
    leaders: list[str] = []

    def loop(i: int) -> None:
        try:
            for _ in range(15):
                if h.executors[i].tick():
                    leaders.append(h.executors[i].instance)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    h.now += 11  # the leader "dies"; whoever ticks next takes over
    for i in (1, 0):
        h.executors[i].tick()
    revisions: dict[str, set[int]] = {}
    for _, state, _ in h.published:
        revisions.setdefault(state.shop, set()).add(state.revision)
    assert sorted(revisions) == SHOPS and all(r == {1} for r in revisions.values())
    assert len(set(leaders)) == 1  # while the lease was valid, one instance only

"""The executor's pure step: rollout state in, actions out, no database and no broker."""

from __future__ import annotations

from fleet_controller.registry.read import ReportedStateView
from fleet_controller.rollout.planner import PlannedWave, RolloutPlan
from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.releases import ReleaseSpec
from fleet_controller.rollout.step import (
    HaltWave,
    MoveShop,
    PublishDesired,
    Republish,
    RolloutRow,
    ShopRow,
    SkipPending,
    StepInput,
    UpdateRollout,
    step,
)

NOW = 1_800_000_000.0
DIGEST = "@sha256:" + "ab" * 32
R2 = ReleaseSpec(name="r2", version="2", images={"vision": "reg.example/vision" + DIGEST})
R1 = ReleaseSpec(name="r1", version="1", images={"vision": "reg.example/vision" + DIGEST})
PLAN = RolloutPlan("r2", (PlannedWave("canary", ("a", "b")), PlannedWave("all", ("c", "d", "e"))))


def state(*shops: ShopRow, status: str = "running", wave: int = 0, deadline: float | None = None, **kw) -> StepInput:
    policy = policy_from_dict({"waves": [{"name": "canary", "shops": ["a", "b"]}, {"name": "all", "percent": 100}],
                               "max_in_flight": kw.pop("max_in_flight", 10), "bake_time_s": 60, "apply_timeout_s": 120})
    return StepInput(RolloutRow(7, "r2", status, wave, deadline, None), policy, PLAN, shops,
                     kw.pop("specs", {"r2": R2, "r1": R1}), NOW, 30.0, **kw)


def report(revision: int, status: str = "applied", error: str = "") -> ReportedStateView:
    return ReportedStateView(node="pi-1", release="r2", revision=revision, status=status, error=error, objects=[], ts=NOW, received_at=NOW)


def test_an_applied_report_moves_the_shop_to_baking_and_a_refusal_fails_it():
    s = state(ShopRow("a", 0, "applying", "r1", revision=3, started_at=NOW - 5),
              ShopRow("b", 0, "applying", "r1", revision=4, started_at=NOW - 5),
              reports={"a": report(3), "b": report(4, "refused", "bad signature")})
    actions = step(s)
    assert actions[0] == MoveShop("a", "applying", {"state": "baking", "applied_at": NOW, "reason": "applied; baking"})
    assert actions[1].shop == "b" and actions[1].gate == "apply" and actions[1].values["reason"] == "shop reported refused: bad signature"


def test_a_failed_shop_halts_its_wave_and_rolls_back_the_others():
    s = state(ShopRow("a", 0, "failed", "r1", revision=3, reason="gate fps: 2 fps"),
              ShopRow("b", 0, "baking", None, revision=4, applied_at=NOW - 10),
              ShopRow("c", 1, "pending", "r1"))
    actions = step(s)
    halts = [a for a in actions if isinstance(a, HaltWave)]
    assert halts == [HaltWave(0, "wave 0 failed: a: gate fps: 2 fps")]
    after = actions[actions.index(halts[0]) + 1:]
    # a goes back to r1; b has no previous release: it fails instead; c (pending) is never started
    assert PublishDesired("a", "r1", "rolling_back", "rollback", {"rollback_revision": None, "done_at": NOW}, "rollback_revision") in after
    assert any(isinstance(a, MoveShop) and a.shop == "b" and "no previous release" in a.values["reason"] for a in after)
    assert not any(getattr(a, "shop", None) == "c" for a in actions)


def test_advance_starts_pending_shops_in_plan_order_up_to_max_in_flight():
    s = state(ShopRow("b", 0, "pending", "r1"), ShopRow("a", 0, "pending", "r1"), max_in_flight=1)
    [action] = step(s)
    assert isinstance(action, PublishDesired) and action.shop == "a" and action.purpose == "rollout"
    assert action.values["state"] == "applying"


def test_a_done_wave_starts_the_next_and_the_last_completes_the_rollout():
    done = (ShopRow("a", 0, "done", "r1"), ShopRow("b", 0, "skipped", "r1"))
    assert step(state(*done)) == [UpdateRollout("wave", "wave canary done; starting all", {"current_wave": 1})]
    last = tuple(ShopRow(x, 1, "done", "r1") for x in "cde")
    assert step(state(*done, *last, wave=1)) == [UpdateRollout("completed", "all 2 waves done", {"status": "completed", "current_wave": 2})]


def test_a_passed_deadline_skips_the_pending_shops_and_expires_an_idle_rollout():
    actions = step(state(ShopRow("a", 0, "pending", "r1"), deadline=NOW - 1))
    assert actions == [SkipPending("deadline passed"),
                       UpdateRollout("expired", "deadline passed before every shop was started", {"status": "expired", "reason": "deadline passed"})]


def test_taking_over_republishes_everything_in_flight_and_a_missing_release_fails_the_rollout():
    s = state(ShopRow("a", 0, "applying", "r1", revision=5, started_at=NOW - 5), resume=True, published_at={"a": NOW})
    assert step(s)[0] == Republish("a", "r2", 5)
    assert step(state(ShopRow("a", 0, "pending", "r1"), specs={"r2": "release 'r2' does not exist"})) == [
        UpdateRollout("failed", "release 'r2' does not exist", {"status": "failed", "reason": "release 'r2' does not exist"})]


def test_maintenance_holds_a_shop_of_the_wave_until_it_ends_and_a_rollback_still_goes_through():
    from fleet_controller.rollout.step import MAINTENANCE_HOLD

    pending = (ShopRow("a", 0, "pending", "r1"), ShopRow("b", 0, "pending", "r1"))
    held = step(state(*pending, maintenance=frozenset({"a"})))
    # a keeps its place with the reason, b (not in maintenance) starts; the wave does not advance past a
    assert MoveShop("a", "pending", {"reason": MAINTENANCE_HOLD}) in held
    assert [x.shop for x in held if isinstance(x, PublishDesired)] == ["b"]
    # the next step does not write the reason again
    again = step(state(ShopRow("a", 0, "pending", "r1", reason=MAINTENANCE_HOLD), ShopRow("b", 0, "baking", None, revision=4,
                                                                                         applied_at=NOW), maintenance=frozenset({"a"})))
    assert not any(getattr(x, "shop", None) == "a" for x in again)
    # maintenance over: a starts
    after = step(state(ShopRow("a", 0, "pending", "r1", reason=MAINTENANCE_HOLD)))
    assert [x.shop for x in after if isinstance(x, PublishDesired)] == ["a"]
    # a shop in maintenance that must roll back is still rolled back (a bad release is worse)
    back = step(state(ShopRow("a", 0, "rolling_back", "r1", revision=3), status="rolling_back", maintenance=frozenset({"a"})))
    assert [x.purpose for x in back if isinstance(x, PublishDesired)] == ["rollback"]

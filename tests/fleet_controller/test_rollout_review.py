"""What an operator reviews and confirms on a rollout: the failure it keeps, previews and confirmation tokens.

Issue 13, problem 4: "Gate failures" listed "back on 2026.11.1" instead of the check that failed,
clicking Rollback on a failed rollout replaced its failure reason, and rollback/abort were one
click with no scope. These tests drive the real executor (the harness of test_rollout_executor)
and the REST API.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet_controller.rollout.api import build_router
from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.store import (
    RolloutError,
    action_scope,
    preview_rollout,
    request_action,
    rollout_status,
    start_rollout,
)
from tests.support.rollout import SHOPS, Harness


@pytest.fixture
def h(db_url, tmp_path) -> Harness:
    harness = Harness(db_url, tmp_path)
    yield harness
    harness.engine.dispose()


def failed_canary(h: Harness) -> int:
    """r1 everywhere, then r2 whose canary s-a runs at 1.9 fps: the fps gate fails it and the wave rolls back."""
    first = h.start("r1", waves=[{"name": "all", "percent": 100}], max_in_flight=10)
    h.tick()
    h.bake(SHOPS, first)
    h.tick()
    rid = h.start("r2")
    h.tick()
    h.report("s-a")
    h.tick(1)
    h.heartbeat("s-a", fps=1.9)
    h.tick(1)
    h.report("s-a")  # the rollback applied
    h.tick(1)
    h.tick(1)
    assert rollout_status(h.engine, rid)["status"] == "failed"
    return rid


def test_a_failed_rollout_keeps_the_gate_value_and_threshold_whatever_happens_next(h: Harness):
    """Before: the shop's reason became "back on r1" and a later Rollback replaced the rollout's reason."""
    rid = failed_canary(h)
    st = rollout_status(h.engine, rid)
    expected = {"shop": "s-a", "gate": "fps", "value": 1.9, "threshold": 5.0}
    assert {k: st["failure"][k] for k in expected} == expected
    assert "n1/cam runs at 1.9 fps, below 5.0" in st["failure"]["reason"]
    assert st["problem_shops"] == [{"shop": "s-a", "reason": "back on r1"}]  # the shop's state moved on...
    reason = st["reason"]
    assert "gate fps" in reason
    scope = action_scope(h.engine, rid, "rollback")
    request_action(h.engine, rid, "rollback", confirm=scope["token"], now=h.now)
    h.tick(1)
    for _ in range(3):
        h.tick(200)  # rollback of shops that never changed: times out, rollout ends
    after = rollout_status(h.engine, rid)
    assert after["status"] != "failed"  # ...and so did the rollout's
    assert after["reason"] == reason  # but why it failed stays
    assert after["failure"] == st["failure"] and after["gate_failures"] == st["gate_failures"]


def test_destructive_actions_need_the_token_of_the_scope_they_were_shown(h: Harness):
    """Before: POST /rollouts/{id}/rollback rolled the fleet back at once, with no confirmation at all."""
    rid = h.start("r1", waves=[{"name": "canary", "shops": ["s-a"]}, {"name": "all", "percent": 100}])
    app = FastAPI()
    app.include_router(build_router(h.engine))
    c = TestClient(app)
    r = c.post(f"/api/v1/rollouts/{rid}/rollback", json={})
    assert r.status_code == 428 and f"/api/v1/rollouts/{rid}/rollback/scope" in r.json()["detail"]
    assert rollout_status(h.engine, rid)["status"] == "running"
    scope = c.get(f"/api/v1/rollouts/{rid}/abort/scope").json()
    assert scope["scope"] == f"Abort rollout #{rid} (r1): 4 pending shops not started" and scope["skip"] == SHOPS
    h.tick()  # s-a starts applying: the scope the operator saw is no longer true
    r = c.post(f"/api/v1/rollouts/{rid}/abort", json={"confirm": scope["token"]})
    assert r.status_code == 409 and "changed since it was shown" in r.json()["detail"] and "1 in progress" in r.json()["detail"]
    fresh = c.get(f"/api/v1/rollouts/{rid}/abort/scope").json()
    r = c.post(f"/api/v1/rollouts/{rid}/abort", json={"confirm": fresh["token"], "reason": "bad model"})
    assert r.status_code == 200 and r.json()["status"] == "aborted"
    assert c.get(f"/api/v1/rollouts/{rid}/explode/scope").status_code == 404
    assert c.post(f"/api/v1/rollouts/{rid}/pause", json={}).status_code == 409  # pause needs no token, the state machine still rules


def test_preview_shows_waves_windows_and_confirms_exactly_that_plan(h: Harness):
    policy = policy_from_dict({"waves": [{"name": "canary", "shops": ["s-b"]}, {"name": "all", "percent": 100}],
                               "windows": {"local": [{"start": "02:00", "end": "05:00"}]}, "target": {"exclude": ["s-d"]}})
    p = preview_rollout(h.engine, "r1", policy)
    assert [(w["name"], sorted(s["id"] for s in w["shops"])) for w in p["waves"]] == [("canary", ["s-b"]), ("all", ["s-a", "s-c"])]
    assert p["shops"] == 3 and p["skipped"] == [{"shop": "s-d", "reason": "excluded"}]
    assert p["windows"]["summary"] == "local 02:00-05:00" and p["waves"][0]["shops"][0]["timezone"] == "Europe/Berlin"
    assert p["problems"] == []
    h.registry.register_shop("s-e")  # the fleet grew after the preview: the plan is not the one confirmed
    with pytest.raises(RolloutError, match="changed since it was previewed"):
        start_rollout(h.engine, "r1", policy, confirm=p["token"])
    again = preview_rollout(h.engine, "r1", policy)
    assert again["shops"] == 4
    rid = start_rollout(h.engine, "r1", policy, confirm=again["token"])["id"]
    assert preview_rollout(h.engine, "r1", policy)["problems"] == [f"rollout {rid} of r1 is still active: wait for it, or abort it first"]

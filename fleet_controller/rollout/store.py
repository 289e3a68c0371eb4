"""Rollouts in SQL: start one (plan it and store the plan), read its status, ask it to change.

The API, the CLI (``--db``) and the executor all go through these functions, so an operator's
``pause`` and the executor's next step are ordinary row changes and the executor, whichever
controller runs it, sees them on its next tick. Operator actions are checked against the state
machine here and refused with a sentence saying what is possible instead.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection, Engine

from fleet_controller.registry.db import table_of
from fleet_controller.registry.read import RegistryReader
from fleet_controller.rollout import manifests
from fleet_controller.rollout.models import (
    ACTIVE_ROLLOUT_STATES,
    RolloutEvent,
    RolloutRecord,
    RolloutShop,
    ShopDesired,
)
from fleet_controller.rollout.planner import FleetShop, RolloutPlan, plan_rollout
from fleet_controller.rollout.policy import RolloutPolicy
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore

ROLLOUTS = table_of(RolloutRecord)
RSHOPS = table_of(RolloutShop)
REVENTS = table_of(RolloutEvent)
DESIRED = table_of(ShopDesired)

ACTIONS = ("pause", "resume", "abort", "rollback")
OVERLAY_LABEL = "manifests-overlay"
"""Shop label that picks the edge overlay its desired state is rendered from (default: production)."""


class RolloutError(ValueError):
    """An operator request that cannot be done now; the message says why and what can."""


class RolloutNotFound(RolloutError, LookupError):
    """No rollout with that id."""


def load_fleet(reader: RegistryReader, conn: Connection) -> list[FleetShop]:
    """Return every known shop with region, labels, node classes, time zone and current release.

    The shops, their nodes and reports come from the registry's read models; the desired release
    from this package's own table, on ``conn``.
    """
    classes = reader.node_classes()
    desired = dict(conn.execute(select(DESIRED.c.shop_id, DESIRED.c.release)).all())
    reported = reader.reported_releases(applied_only=True)
    return [
        FleetShop(
            id=s.id,
            region=s.region or "",
            labels=dict(s.labels),
            node_classes=classes.get(s.id, frozenset()),
            timezone=s.timezone or "UTC",
            release=desired.get(s.id) or reported.get(s.id),
        )
        for s in reader.shops()
    ]


def check_renders(spec: ReleaseSpec, shops: list[FleetShop]) -> None:
    """Render one shop per overlay and node-class set and validate it; raise ``RolloutError`` naming the problem."""
    seen: set[tuple[str, frozenset[str]]] = set()
    for shop in shops:
        overlay = shop.labels.get(OVERLAY_LABEL) or manifests.DEFAULT_EDGE_OVERLAY
        if (overlay, shop.node_classes) in seen:
            continue
        seen.add((overlay, shop.node_classes))
        try:
            objs = manifests.render_shop(manifests.ShopTarget(shop.id, shop.node_classes, overlay), spec.render_input(), 1)
        except ValueError as exc:
            raise RolloutError(f"shop {shop.id} (label {OVERLAY_LABEL}={overlay}): {exc}") from None
        findings = manifests.validate([manifests.Sourced(o, f"render:{shop.id}") for o in objs])
        if findings:
            raise RolloutError(f"release {spec.name} renders invalid objects for shop {shop.id}: " + "; ".join(f.describe() for f in findings[:3]))


def log_event(conn: Connection, rollout_id: int, kind: str, message: str, shop: str | None = None, now: float | None = None) -> None:
    """Append one entry to a rollout's event log."""
    conn.execute(insert(REVENTS).values(rollout_id=rollout_id, at=time.time() if now is None else now, kind=kind, shop_id=shop, message=message[:2000]))


def start_rollout(engine: Engine, release: str, policy: RolloutPolicy, now: float | None = None) -> dict[str, Any]:
    """Plan and store a rollout of ``release``; refuse if another rollout is active or nothing is targeted."""
    now = time.time() if now is None else now
    spec = ReleaseStore(engine).get(release)  # raises ReleaseError naming the fix
    with engine.begin() as conn:
        active = conn.execute(select(ROLLOUTS.c.id, ROLLOUTS.c.release).where(ROLLOUTS.c.status.in_(ACTIVE_ROLLOUT_STATES))).first()
        if active is not None:
            raise RolloutError(f"rollout {active.id} of {active.release} is still active: wait for it, or abort it first")
        fleet = load_fleet(RegistryReader(engine), conn)
        plan = plan_rollout(fleet, release, policy)
        if not plan.shops:
            why = "; ".join(f"{s}: {r}" for s, r in plan.skipped[:5]) or "the fleet has no shops"
            raise RolloutError(f"release {release} targets no shop ({why}): check the policy's target and waves")
        check_renders(spec, [s for s in fleet if s.id in set(plan.shops)])
        from_release = {s.id: s.release for s in fleet}
        key = conn.execute(
            insert(ROLLOUTS).values(
                release=release,
                policy=policy.model_dump(mode="json"),
                plan=plan.to_json(),
                status="running",
                reason="",
                current_wave=0,
                created_at=now,
                updated_at=now,
                deadline_at=now + policy.deadline_s if policy.deadline_s else None,
            )
        ).inserted_primary_key
        if key is None:
            raise RuntimeError("the database returned no id for the new rollout")
        rid = int(key[0])
        rows: list[dict[str, Any]] = [
            {"rollout_id": rid, "shop_id": s, "wave": i, "state": "pending", "from_release": from_release.get(s), "reason": "", "baseline": {}}
            for i, w in enumerate(plan.waves)
            for s in w.shops
        ]
        conn.execute(insert(RSHOPS), rows)
        log_event(conn, rid, "started", f"{len(rows)} shops in {len(plan.waves)} waves, {len(plan.skipped)} skipped", now=now)
    return rollout_status(engine, rid)


def _get(conn: Connection, rollout_id: int) -> Any:
    r = conn.execute(select(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id)).first()
    if r is None:
        raise RolloutNotFound(f"no rollout {rollout_id}: list them with 'shopfleet rollout status'")
    return r


def rollout_status(engine: Engine, rollout_id: int, *, events: int = 20) -> dict[str, Any]:
    """Return a rollout with progress per wave (shop counts by state) and its latest events."""
    with engine.connect() as conn:
        r = _get(conn, rollout_id)
        plan = RolloutPlan.from_json(r.plan)
        counts: dict[int, dict[str, int]] = defaultdict(dict)
        for wave, state, n in conn.execute(
            select(RSHOPS.c.wave, RSHOPS.c.state, func.count()).where(RSHOPS.c.rollout_id == rollout_id).group_by(RSHOPS.c.wave, RSHOPS.c.state)
        ):
            counts[wave][state] = n
        failed = conn.execute(
            select(RSHOPS.c.shop_id, RSHOPS.c.reason).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.state.in_(("failed", "rolled_back", "rolling_back"))).limit(20)
        ).all()
        ev = conn.execute(
            select(REVENTS).where(REVENTS.c.rollout_id == rollout_id).order_by(REVENTS.c.id.desc()).limit(events)
        ).all()
    waves = []
    for i, w in enumerate(plan.waves):
        c = counts.get(i, {})
        total = sum(c.values())
        waves.append({"index": i, "name": w.name, "shops": total, "done": c.get("done", 0), "states": c})
    return {
        "id": r.id,
        "release": r.release,
        "status": r.status,
        "reason": r.reason,
        "current_wave": r.current_wave,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "deadline_at": r.deadline_at,
        "waves": waves,
        "skipped": len(plan.skipped),
        "problem_shops": [{"shop": s, "reason": why} for s, why in failed],
        "events": [{"at": e.at, "kind": e.kind, "shop": e.shop_id, "message": e.message} for e in reversed(ev)],
    }


def list_rollouts(engine: Engine, limit: int = 50) -> list[dict[str, Any]]:
    """Return the newest rollouts (id, release, status, reason, times)."""
    with engine.connect() as conn:
        rows = conn.execute(select(ROLLOUTS).order_by(ROLLOUTS.c.id.desc()).limit(limit)).all()
    return [
        {"id": r.id, "release": r.release, "status": r.status, "reason": r.reason, "current_wave": r.current_wave, "created_at": r.created_at, "updated_at": r.updated_at}
        for r in rows
    ]


def request_action(engine: Engine, rollout_id: int, action: str, reason: str = "", now: float | None = None) -> dict[str, Any]:
    """Pause, resume, abort or roll back a rollout; refuse transitions the state machine does not allow."""
    now = time.time() if now is None else now
    if action not in ACTIONS:
        raise RolloutError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    with engine.begin() as conn:
        r = _get(conn, rollout_id)
        allowed = {
            "pause": ("running",),
            "resume": ("paused",),
            "abort": ("running", "paused"),
            "rollback": ("running", "paused", "completed", "failed", "aborted", "expired"),
        }[action]
        if r.status not in allowed:
            raise RolloutError(f"rollout {rollout_id} is {r.status}; '{action}' needs it to be {' or '.join(allowed)}")
        note = reason or f"{action} requested"
        if action == "pause":
            values = {"status": "paused", "reason": note}
        elif action == "resume":
            values = {"status": "running", "reason": ""}
        elif action == "abort":
            conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.state == "pending").values(state="skipped", reason="aborted"))
            values = {"status": "aborted", "reason": note}
        else:
            touched = conn.execute(
                update(RSHOPS)
                .where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.state.in_(("applying", "baking", "done", "failed")))
                .values(state="rolling_back", reason=note, rollback_revision=None)
            ).rowcount
            conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.state == "pending").values(state="skipped", reason=note))
            values = {"status": "rolling_back", "final_status": "rolled_back", "reason": note}
            note = f"{note}: {touched} shops to roll back"
        conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id).values(updated_at=now, **values))
        log_event(conn, rollout_id, action, note, now=now)
    return rollout_status(engine, rollout_id)

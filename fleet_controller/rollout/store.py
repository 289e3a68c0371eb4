"""Rollouts in SQL: start one (plan it and store the plan), read its status, ask it to change.

The API, the CLI (``--db``) and the executor all go through these functions, so an operator's
``pause`` and the executor's next step are ordinary row changes and the executor, whichever
controller runs it, sees them on its next tick. Operator actions are checked against the state
machine here and refused with a sentence saying what is possible instead.

Two things an operator must see before acting, and keep seeing after:

* **Previews with a confirmation token.** :func:`preview_rollout` plans a rollout without storing
  it, :func:`action_scope` names what an abort or rollback would touch; each returns a ``token``,
  a digest of exactly that plan or scope. :func:`start_rollout` and :func:`request_action` given
  a token refuse if the plan or scope changed since (a shop went offline, a wave finished), so
  what was confirmed is what happens. The digest is not a secret: the session and CSRF check
  say who may act, the token says they looked.
* **Failures kept for good.** :func:`record_failure` stores the check that failed a shop (gate,
  measured value, threshold, reason) in ``rollout_failures`` once; a later rollback, abort or
  completion changes the rollout's and the shop's state and reason, never that record, and
  :func:`rollout_status` reports it as ``failure`` (the first) and ``gate_failures`` (each shop).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import (
    Float,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapped, mapped_column

from fleet_controller.registry.db import Base, table_of
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


class RolloutFailure(Base):
    """The check that failed one shop of one rollout: written once, never updated (revision ``0002a_rollout_failures``)."""

    __tablename__ = "rollout_failures"
    rollout_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    shop_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    gate: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)
    __table_args__ = (ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),)


ROLLOUTS = table_of(RolloutRecord)
FAILURES = table_of(RolloutFailure)
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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()[:32]


def plan_token(release: str, policy: RolloutPolicy, plan: RolloutPlan) -> str:
    """Return the confirmation token of a planned rollout: a digest of release, policy and plan."""
    return _digest({"release": release, "policy": policy.model_dump(mode="json"), "plan": plan.to_json()})


def preview_rollout(engine: Engine, release: str, policy: RolloutPolicy) -> dict[str, Any]:
    """Plan a rollout of ``release`` without storing it: waves with their shops, skipped shops, windows, gates, and a token.

    ``problems`` lists what would make :func:`start_rollout` refuse (another rollout active,
    nothing targeted, a shop's manifests that do not render); ``token`` confirms exactly this
    plan to :func:`start_rollout`.
    """
    spec = ReleaseStore(engine).get(release)  # raises ReleaseError naming the fix
    with engine.connect() as conn:
        active = conn.execute(select(ROLLOUTS.c.id, ROLLOUTS.c.release).where(ROLLOUTS.c.status.in_(ACTIVE_ROLLOUT_STATES))).first()
        fleet = load_fleet(RegistryReader(engine), conn)
    plan = plan_rollout(fleet, release, policy)
    by_id = {s.id: s for s in fleet}
    problems: list[str] = []
    if active is not None:
        problems.append(f"rollout {active.id} of {active.release} is still active: wait for it, or abort it first")
    if not plan.shops:
        problems.append(f"release {release} targets no shop: check the policy's target and waves")
    try:
        check_renders(spec, [s for s in fleet if s.id in set(plan.shops)])
    except RolloutError as exc:
        problems.append(str(exc))
    w = policy.windows
    return {
        "release": release,
        "waves": [
            {"index": i, "name": wave.name, "shops": [
                {"id": sid, "region": by_id[sid].region, "timezone": by_id[sid].timezone, "from_release": by_id[sid].release}
                for sid in wave.shops if sid in by_id]}
            for i, wave in enumerate(plan.waves)
        ],
        "shops": len(plan.shops),
        "skipped": [{"shop": sid, "reason": why} for sid, why in plan.skipped],
        "windows": {"local": [f"{t.start}-{t.end}" for t in w.local], "idle": w.idle is not None,
                    "summary": ("any time" if not w.local and w.idle is None else
                                " or ".join([f"local {t.start}-{t.end}" for t in w.local] + (["when idle"] if w.idle else [])))},
        "max_in_flight": policy.max_in_flight,
        "bake_time_s": policy.bake_time_s,
        "apply_timeout_s": policy.apply_timeout_s,
        "deadline_s": policy.deadline_s,
        "gates": policy.gates.model_dump(mode="json"),
        "problems": problems,
        "token": plan_token(release, policy, plan),
    }


def start_rollout(engine: Engine, release: str, policy: RolloutPolicy, now: float | None = None, *,
                  confirm: str | None = None) -> dict[str, Any]:
    """Plan and store a rollout of ``release``; refuse if another rollout is active or nothing is targeted.

    With ``confirm`` (the token of :func:`preview_rollout`), also refuse if the plan is no longer
    the one previewed.
    """
    now = time.time() if now is None else now
    spec = ReleaseStore(engine).get(release)  # raises ReleaseError naming the fix
    with engine.begin() as conn:
        active = conn.execute(select(ROLLOUTS.c.id, ROLLOUTS.c.release).where(ROLLOUTS.c.status.in_(ACTIVE_ROLLOUT_STATES))).first()
        if active is not None:
            raise RolloutError(f"rollout {active.id} of {active.release} is still active: wait for it, or abort it first")
        fleet = load_fleet(RegistryReader(engine), conn)
        plan = plan_rollout(fleet, release, policy)
        if confirm is not None and confirm != plan_token(release, policy, plan):
            raise RolloutError(f"the plan of {release} changed since it was previewed (the fleet or its releases moved): "
                               "preview it again and confirm the new plan")
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
        gate_failures = failures(conn, rollout_id)
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
        "failure": gate_failures[0] if gate_failures else None,
        "gate_failures": gate_failures,
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


ALLOWED: dict[str, tuple[str, ...]] = {
    "pause": ("running",),
    "resume": ("paused",),
    "abort": ("running", "paused"),
    "rollback": ("running", "paused", "completed", "failed", "aborted", "expired"),
}
"""The rollout states each operator action may start from."""
DESTRUCTIVE = ("abort", "rollback")
"""Actions the API performs only with the token of :func:`action_scope` (the operator saw the scope)."""
KEEPS_REASON = ("failed", "expired", "aborted")
"""A rollout that ended in one of these keeps its reason when rolled back afterwards: why it ended is history."""


def _scope(conn: Connection, r: Any, action: str) -> dict[str, Any]:
    if r.status not in ALLOWED[action]:
        raise RolloutError(f"rollout {r.id} is {r.status}; '{action}' needs it to be {' or '.join(ALLOWED[action])}")
    rows = conn.execute(select(RSHOPS.c.shop_id, RSHOPS.c.state, RSHOPS.c.from_release)
                        .where(RSHOPS.c.rollout_id == r.id).order_by(RSHOPS.c.shop_id)).all()
    pending = [x.shop_id for x in rows if x.state == "pending"]
    if action == "rollback":
        back = [{"shop": x.shop_id, "to": x.from_release} for x in rows if x.state in ("applying", "baking", "done", "failed")]
        scope = (f"Roll back rollout #{r.id} ({r.release}): {len(back)} shop{'s' if len(back) != 1 else ''} "
                 f"return{'s' if len(back) == 1 else ''} to {'their' if len(back) != 1 else 'its'} previous release"
                 + (f"; {len(pending)} pending not started" if pending else ""))
        affected: dict[str, Any] = {"rollback": back, "skip": pending}
    elif action == "abort":
        running = [x.shop_id for x in rows if x.state in ("applying", "baking")]
        scope = (f"Abort rollout #{r.id} ({r.release}): {len(pending)} pending shop{'s' if len(pending) != 1 else ''} not started"
                 + (f"; {len(running)} in progress keep {r.release}" if running else ""))
        affected = {"skip": pending, "keep": running}
    else:
        scope = f"{action.capitalize()} rollout #{r.id} ({r.release})"
        affected = {}
    return {"rollout": r.id, "release": r.release, "action": action, "status": r.status, "scope": scope, **affected,
            "token": _digest({"rollout": r.id, "action": action, "status": r.status, **affected})}


def action_scope(engine: Engine, rollout_id: int, action: str) -> dict[str, Any]:
    """Return what ``action`` would do to the rollout now: a sentence naming its scope, the shops, and a confirmation token."""
    if action not in ACTIONS:
        raise RolloutError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    with engine.connect() as conn:
        return _scope(conn, _get(conn, rollout_id), action)


def request_action(engine: Engine, rollout_id: int, action: str, reason: str = "", now: float | None = None, *,
                   confirm: str | None = None) -> dict[str, Any]:
    """Pause, resume, abort or roll back a rollout; refuse transitions the state machine does not allow.

    With ``confirm`` (the token of :func:`action_scope`), refuse if the scope changed since it was
    shown. Rolling back a rollout that already ended (failed, expired, aborted) keeps its reason.
    """
    now = time.time() if now is None else now
    if action not in ACTIONS:
        raise RolloutError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    with engine.begin() as conn:
        r = _get(conn, rollout_id)
        scope = _scope(conn, r, action)
        if confirm is not None and confirm != scope["token"]:
            raise RolloutError(f"the scope of '{action}' on rollout {rollout_id} changed since it was shown (now: {scope['scope']}): "
                               "review it again and confirm")
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
            if r.status in KEEPS_REASON and r.reason:
                del values["reason"]  # why it ended stays; the event log records the rollback
            note = f"{note}: {touched} shops to roll back"
        conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id).values(updated_at=now, **values))
        log_event(conn, rollout_id, action, note, now=now)
    return rollout_status(engine, rollout_id)


def record_failure(conn: Connection, rollout_id: int, shop: str, gate: str, reason: str, value: float | None,
                   threshold: float | None, now: float) -> bool:
    """Store the check that failed ``shop`` in the rollout, unless one is stored already; return whether this one was.

    Called in the transaction that marks the shop failed, so the record and the state change
    are one; the first failure of a shop is the one that counts and is never overwritten.
    """
    if conn.execute(select(FAILURES.c.gate).where(FAILURES.c.rollout_id == rollout_id, FAILURES.c.shop_id == shop)).first():
        return False
    conn.execute(insert(FAILURES).values(rollout_id=rollout_id, shop_id=shop, gate=gate, value=value, threshold=threshold,
                                         reason=reason[:2000], at=now))
    return True


def failures(conn: Connection, rollout_id: int) -> list[dict[str, Any]]:
    """Return the stored failures of a rollout, first first: shop, gate, value, threshold, reason, at."""
    rows = conn.execute(select(FAILURES).where(FAILURES.c.rollout_id == rollout_id).order_by(FAILURES.c.at, FAILURES.c.shop_id)).all()
    return [{"shop": x.shop_id, "gate": x.gate, "value": x.value, "threshold": x.threshold, "reason": x.reason, "at": x.at} for x in rows]


def latest_rollout_shops(engine: Engine) -> dict[str, dict[str, Any]]:
    """Return each shop's place in the newest rollout: rollout id, release, rollout status, shop state, failure.

    For the fleet table: a shop whose last rollout failed it shows the failed check until a newer
    rollout starts. Shops outside the newest rollout are absent.
    """
    with engine.connect() as conn:
        r = conn.execute(select(ROLLOUTS.c.id, ROLLOUTS.c.release, ROLLOUTS.c.status).order_by(ROLLOUTS.c.id.desc()).limit(1)).first()
        if r is None:
            return {}
        rows = conn.execute(select(RSHOPS.c.shop_id, RSHOPS.c.state).where(RSHOPS.c.rollout_id == r.id)).all()
        failed = {f["shop"]: f for f in failures(conn, r.id)}
    return {s: {"rollout": r.id, "release": r.release, "status": r.status, "state": state, "failure": failed.get(s)} for s, state in rows}

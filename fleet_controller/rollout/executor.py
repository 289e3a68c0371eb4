"""The rollout executor: moves shops through a stored plan, one persisted step at a time.

Shaped by three promises of the issue:

* **Every step is in the database.** A tick reads the active rollout and its shops, decides with
  the pure functions of :mod:`.gates`, and writes each transition as a conditional update
  (``... WHERE state = <expected>``) together with the shop's new desired revision. Nothing lives
  only in memory, so a controller killed mid-rollout resumes on its next start: shops still
  ``applying`` get their desired state re-published (same revision, which the agent treats as
  already applied if it was), everything else continues from its row.
* **Exactly once across controllers.** Several controllers may share one database; a lease row
  (``executor_leases``, holder and expiry, taken with one conditional ``UPDATE`` that works the same
  on SQLite and PostgreSQL) makes one of them the executor. Should two ever overlap (a tick longer
  than the lease), the conditional updates still let only one of them move a given shop.
* **Desired state is published after it is committed.** The revision counter is bumped and stored
  first, then the signed message is published retained on ``Topics.desired(shop)``. A crash in
  between leaves a row that the re-publish step completes; the reverse order could hand two
  different contents the same revision.

A shop goes ``pending -> applying -> baking -> done``. A failed apply or gate marks it ``failed``;
the executor then rolls the whole wave back to each shop's previous release and halts the rollout
(``rolling_back``, then ``failed``). Maintenance windows, ``max_in_flight`` and the deadline only
govern starting shops; a rollback ignores windows, because a bad release is worse than an update
during opening hours.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from edge_agent.protocol import Topics, encode
from fleet_controller.registry.models import LatestReading, Node, ReportedStateRecord
from fleet_controller.rollout import manifests
from fleet_controller.rollout.gates import NodeHealth, ReadingValue, evaluate_gates, window_open
from fleet_controller.rollout.models import ACTIVE_ROLLOUT_STATES, ExecutorLease
from fleet_controller.rollout.planner import FleetShop, RolloutPlan
from fleet_controller.rollout.policy import RolloutPolicy
from fleet_controller.rollout.releases import (
    ReleaseError,
    ReleaseSpec,
    ReleaseStore,
    desired_state_for,
)
from fleet_controller.rollout.signing import Signer
from fleet_controller.rollout.store import (
    DESIRED,
    OVERLAY_LABEL,
    ROLLOUTS,
    RSHOPS,
    load_fleet,
    log_event,
)
from fleet_controller.settings import ExecutorSettings

log = logging.getLogger(__name__)

LEASE_NAME = "rollout-executor"
LEASES = ExecutorLease.__table__

Publish = Callable[[str, bytes, bool, int], None]
"""``publish(topic, payload, retain, qos)``: blocks until the broker acknowledged it, raises on failure."""


class RolloutMetrics:
    """Prometheus metrics of the executor, on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "shopfleet_rollout_desired_published_total", "Signed desired states published, by purpose (rollout, rollback, republish).", ["purpose"], registry=registry
        )
        self.shops = Counter("shopfleet_rollout_shops_total", "Shops that finished a rollout step, by outcome (done, failed, rolled_back).", ["outcome"], registry=registry)
        self.gate_failures = Counter("shopfleet_rollout_gate_failures_total", "Shops failed by a health gate or apply, by gate.", ["gate"], registry=registry)
        self.errors = Counter("shopfleet_rollout_executor_errors_total", "Executor steps that failed, by reason.", ["reason"], registry=registry)
        self.leader = Gauge("shopfleet_rollout_executor_leader", "1 while this controller holds the executor lease.", registry=registry)
        self.tick_seconds = Histogram("shopfleet_rollout_tick_seconds", "Duration of one executor step.", registry=registry)


def _insert(conn: Connection, table: Any) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


class RolloutExecutor:
    """Run active rollouts: one instance per controller, one leader per database."""

    def __init__(
        self,
        engine: Engine,
        signer: Signer,
        publish: Publish,
        *,
        instance: str,
        metrics_registry: CollectorRegistry,
        tick_interval_s: float = 2.0,
        lease_ttl_s: float = 15.0,
        republish_after_s: float = 30.0,
        manifests_root: Path = manifests.MANIFESTS_ROOT,
        clock: Callable[[], float] = time.time,
        publish_concurrency: int = 16,
    ) -> None:
        self.engine = engine
        self.signer = signer
        self.publish = publish
        self.instance = instance
        self.metrics = RolloutMetrics(metrics_registry)
        self.tick_interval_s = tick_interval_s
        self.lease_ttl_s = lease_ttl_s
        self.republish_after_s = republish_after_s
        self.manifests_root = manifests_root
        self.clock = clock
        self.releases = ReleaseStore(engine)
        self.is_leader = False
        self._pool = ThreadPoolExecutor(max_workers=publish_concurrency, thread_name_prefix="rollout-publish")

    @classmethod
    def from_settings(cls, engine: Engine, settings: ExecutorSettings, publish: Publish, *, instance: str, metrics_registry: CollectorRegistry) -> RolloutExecutor:
        """Return an executor configured by ``settings`` (loads the signing key)."""
        return cls(
            engine, Signer.from_file(settings.signing_key), publish, instance=instance, metrics_registry=metrics_registry,
            tick_interval_s=settings.tick_interval_s, lease_ttl_s=settings.lease_ttl_s, republish_after_s=settings.republish_after_s,
            publish_concurrency=settings.publish_concurrency,
        )

    # ----- leadership -----------------------------------------------------------------------

    def acquire_lease(self, now: float) -> bool:
        """Take or renew the executor lease; return whether this instance holds it."""
        with self.engine.begin() as conn:
            conn.execute(_insert(conn, LEASES).values(name=LEASE_NAME, holder=self.instance, expires_at=now + self.lease_ttl_s).on_conflict_do_nothing())
            got = conn.execute(
                update(LEASES)
                .where(LEASES.c.name == LEASE_NAME, or_(LEASES.c.holder == self.instance, LEASES.c.expires_at < now))
                .values(holder=self.instance, expires_at=now + self.lease_ttl_s)
            ).rowcount
        return got == 1

    def release_lease(self) -> None:
        """Give the lease up (on shutdown), so another controller takes over at once."""
        with self.engine.begin() as conn:
            conn.execute(update(LEASES).where(LEASES.c.name == LEASE_NAME, LEASES.c.holder == self.instance).values(expires_at=0.0))
        self.is_leader = False
        self.metrics.leader.set(0)

    # ----- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Step every ``tick_interval_s`` until cancelled (a service worker); a failing step is logged and counted."""
        try:
            while True:
                try:
                    await asyncio.to_thread(self.tick)
                except Exception as exc:
                    self.metrics.errors.labels(type(exc).__name__).inc()
                    log.exception("rollout executor step failed: %s", exc)
                await asyncio.sleep(self.tick_interval_s)
        finally:
            await asyncio.to_thread(self.release_lease)

    def tick(self) -> bool:
        """Run one step of every active rollout if this instance is the executor; return whether it was."""
        now = self.clock()
        with self.metrics.tick_seconds.time():
            leader = self.acquire_lease(now)
            became = leader and not self.is_leader
            self.is_leader = leader
            self.metrics.leader.set(1 if leader else 0)
            if not leader:
                return False
            with self.engine.connect() as conn:
                active = conn.execute(select(ROLLOUTS).where(ROLLOUTS.c.status.in_(ACTIVE_ROLLOUT_STATES)).order_by(ROLLOUTS.c.id)).all()
            for r in active:
                if became:
                    log.info("controller %s is the rollout executor; resuming rollout %s (%s)", self.instance, r.id, r.status)
                self._step(r, now, resume=became)
        return True

    # ----- one rollout ----------------------------------------------------------------------

    def _shops(self, rollout_id: int) -> list[Any]:
        with self.engine.connect() as conn:
            return conn.execute(select(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id)).all()

    def _move(self, rollout_id: int, shop: str, expect: str, now: float, **values: Any) -> bool:
        """Change one shop's row if it is still in state ``expect``; log the step; return whether it moved."""
        with self.engine.begin() as conn:
            n = conn.execute(
                update(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.shop_id == shop, RSHOPS.c.state == expect).values(**values)
            ).rowcount
            if n and "state" in values:
                log_event(conn, rollout_id, values["state"], values.get("reason", ""), shop=shop, now=now)
        return n == 1

    def _set_rollout(self, rollout_id: int, now: float, kind: str, message: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id).values(updated_at=now, **values))
            log_event(conn, rollout_id, kind, message, now=now)
        log.info("rollout %s: %s: %s", rollout_id, kind, message)

    def _step(self, r: Any, now: float, *, resume: bool) -> None:
        policy = RolloutPolicy.model_validate(r.policy)
        plan = RolloutPlan.from_json(r.plan)
        try:
            spec = self.releases.get(r.release)
        except ReleaseError as exc:
            self._set_rollout(r.id, now, "failed", str(exc), status="failed", reason=str(exc))
            return
        shops = self._shops(r.id)
        fleet = self._fleet_for({s.shop_id for s in shops if s.state in ("pending", "applying", "rolling_back")})
        if resume:
            self._republish(r, spec, shops, fleet, now, force=True)
        self._track_apply(r, policy, shops, now)
        self._track_bake(r, policy, self._shops(r.id), now)
        self._track_rollback(r, policy, self._shops(r.id), fleet, now)
        shops = self._shops(r.id)
        if r.status in ("running", "paused") and self._wave_failed(r, shops, now):
            shops = self._shops(r.id)
            self._track_rollback(r, policy, shops, fleet, now)
            return
        if r.status == "running":
            self._republish(r, spec, shops, fleet, now, force=False)
            self._advance(r, policy, plan, spec, shops, fleet, now)
        elif r.status == "rolling_back" and not any(s.state == "rolling_back" for s in shops):
            final = r.final_status or "failed"
            self._set_rollout(r.id, now, final, f"rollback finished; rollout {final}", status=final)

    def _fleet_for(self, shop_ids: set[str]) -> dict[str, FleetShop]:
        if not shop_ids:
            return {}
        with self.engine.connect() as conn:
            return {s.id: s for s in load_fleet(conn) if s.id in shop_ids}

    def _reports(self, shop_ids: list[str]) -> dict[str, Any]:
        if not shop_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(select(ReportedStateRecord.__table__).where(ReportedStateRecord.shop_id.in_(shop_ids))).all()
        return {row.shop_id: row for row in rows}

    def _track_apply(self, r: Any, policy: RolloutPolicy, shops: list[Any], now: float) -> None:
        applying = [s for s in shops if s.state == "applying" and s.revision is not None]
        reports = self._reports([s.shop_id for s in applying])
        for s in applying:
            rep = reports.get(s.shop_id)
            if rep is not None and rep.revision == s.revision and rep.status in ("applied", "failed", "refused"):
                if rep.status == "applied":
                    self._move(r.id, s.shop_id, "applying", now, state="baking", applied_at=now, reason="applied; baking")
                else:
                    self._fail(r.id, s.shop_id, "applying", now, "apply", f"shop reported {rep.status}: {rep.error}")
            elif now - (s.started_at or now) > policy.apply_timeout_s:
                self._fail(r.id, s.shop_id, "applying", now, "apply_timeout", f"no apply report within {policy.apply_timeout_s:.0f}s")

    def _fail(self, rollout_id: int, shop: str, expect: str, now: float, gate: str, reason: str) -> None:
        if self._move(rollout_id, shop, expect, now, state="failed", done_at=now, reason=reason):
            self.metrics.gate_failures.labels(gate).inc()
            self.metrics.shops.labels("failed").inc()
            log.warning("rollout %s: shop %s failed (%s): %s", rollout_id, shop, gate, reason)

    def _node_health(self, shop_ids: list[str]) -> dict[str, list[NodeHealth]]:
        out: dict[str, list[NodeHealth]] = defaultdict(list)
        if not shop_ids:
            return out
        with self.engine.connect() as conn:
            for n in conn.execute(
                select(Node.shop_id, Node.node_id, Node.presence, Node.facts_at, Node.pipelines, Node.metrics).where(Node.shop_id.in_(shop_ids))
            ):
                out[n.shop_id].append(NodeHealth(n.node_id, n.presence, n.facts_at, n.pipelines or {}, n.metrics or {}))
        return out

    def _track_bake(self, r: Any, policy: RolloutPolicy, shops: list[Any], now: float) -> None:
        baking = [s for s in shops if s.state == "baking"]
        health = self._node_health([s.shop_id for s in baking])
        for s in baking:
            v = evaluate_gates(policy.gates, health.get(s.shop_id, []), s.applied_at or now, s.baseline or {}, now)
            if v.state == "fail":
                self._fail(r.id, s.shop_id, "baking", now, v.gate, f"gate {v.gate}: {v.reason}")
                continue
            baked = now - (s.applied_at or now) >= policy.bake_time_s
            if v.state == "pass" and baked and "errors" in (s.baseline or {}):
                if self._move(r.id, s.shop_id, "baking", now, state="done", done_at=now, reason="healthy through bake time"):
                    self.metrics.shops.labels("done").inc()
            elif v.state == "wait" and now - (s.applied_at or now) > policy.bake_time_s + policy.apply_timeout_s:
                self._fail(r.id, s.shop_id, "baking", now, "no_health", f"no fresh health: {v.reason}")
            elif dict(v.baseline) != dict(s.baseline or {}):
                self._move(r.id, s.shop_id, "baking", now, baseline=dict(v.baseline))

    def _wave_failed(self, r: Any, shops: list[Any], now: float) -> bool:
        """If a shop of the current wave failed, start rolling the wave back and halt; return whether it did."""
        wave = [s for s in shops if s.wave == r.current_wave]
        failed = [s for s in wave if s.state == "failed" and s.revision is not None]
        if not failed:
            return False
        first = failed[0]
        reason = f"wave {r.current_wave} failed: {first.shop_id}: {first.reason}"
        with self.engine.begin() as conn:
            conn.execute(
                update(RSHOPS)
                .where(RSHOPS.c.rollout_id == r.id, RSHOPS.c.wave == r.current_wave, RSHOPS.c.state.in_(("applying", "baking", "done", "failed")))
                .values(state="rolling_back", rollback_revision=None)
            )
            conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == r.id, RSHOPS.c.state == "pending").values(state="skipped", reason="rollout halted"))
            conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == r.id).values(status="rolling_back", final_status="failed", reason=reason, updated_at=now))
            log_event(conn, r.id, "halted", f"{reason}; rolling the wave back", now=now)
        log.warning("rollout %s halted: %s", r.id, reason)
        return True

    def _track_rollback(self, r: Any, policy: RolloutPolicy, shops: list[Any], fleet: dict[str, FleetShop], now: float) -> None:
        rolling = [s for s in shops if s.state == "rolling_back"]
        if not rolling:
            return
        reports = self._reports([s.shop_id for s in rolling if s.rollback_revision is not None])
        missing = {s.shop_id for s in rolling} - set(fleet)
        if missing:
            fleet = {**fleet, **self._fleet_for(missing)}
        jobs: list[tuple[str, ReleaseSpec, int, FleetShop | None, str]] = []
        for s in rolling:
            if s.rollback_revision is None:
                self._publish_rollback(r, s, fleet.get(s.shop_id), now, jobs)
                continue
            rep = reports.get(s.shop_id)
            if rep is not None and rep.revision == s.rollback_revision and rep.status == "applied":
                if self._move(r.id, s.shop_id, "rolling_back", now, state="rolled_back", done_at=now, reason=f"back on {s.from_release}"):
                    self.metrics.shops.labels("rolled_back").inc()
            elif rep is not None and rep.revision == s.rollback_revision and rep.status in ("failed", "refused"):
                self._move(r.id, s.shop_id, "rolling_back", now, state="failed", done_at=now, reason=f"rollback {rep.status}: {rep.error}")
            elif now - (s.done_at or s.started_at or now) > policy.apply_timeout_s:
                self._move(r.id, s.shop_id, "rolling_back", now, state="failed", done_at=now, reason="rollback not confirmed in time")
        self._send_all(jobs)

    def _publish_rollback(self, r: Any, s: Any, shop: FleetShop | None, now: float, jobs: list[tuple[str, ReleaseSpec, int, FleetShop | None, str]]) -> None:
        if not s.from_release:
            self._move(r.id, s.shop_id, "rolling_back", now, state="failed", done_at=now, reason=f"no previous release to return to; still on {r.release}")
            return
        try:
            spec = self.releases.get(s.from_release)
        except ReleaseError as exc:
            self._move(r.id, s.shop_id, "rolling_back", now, state="failed", done_at=now, reason=str(exc))
            return
        self._publish_shop(r.id, s.shop_id, spec, shop, now, expect="rolling_back", purpose="rollback",
                           values={"rollback_revision": None, "done_at": now}, revision_column="rollback_revision", defer=jobs)

    def _advance(self, r: Any, policy: RolloutPolicy, plan: RolloutPlan, spec: ReleaseSpec, shops: list[Any], fleet: dict[str, FleetShop], now: float) -> None:
        wave = [s for s in shops if s.wave == r.current_wave]
        if wave and all(s.state in ("done", "skipped") for s in wave):
            nxt = r.current_wave + 1
            if nxt >= len(plan.waves):
                self._set_rollout(r.id, now, "completed", f"all {len(plan.waves)} waves done", status="completed", current_wave=nxt)
            else:
                self._set_rollout(r.id, now, "wave", f"wave {plan.waves[r.current_wave].name} done; starting {plan.waves[nxt].name}", current_wave=nxt)
            return
        in_flight = sum(1 for s in shops if s.state in ("applying", "baking"))
        pending = [s for s in wave if s.state == "pending"]
        if not pending:
            return
        if r.deadline_at is not None and now > r.deadline_at:
            with self.engine.begin() as conn:
                conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == r.id, RSHOPS.c.state == "pending").values(state="skipped", reason="deadline passed"))
            if in_flight == 0:
                self._set_rollout(r.id, now, "expired", "deadline passed before every shop was started", status="expired", reason="deadline passed")
            return
        order = {shop: i for i, shop in enumerate(plan.waves[r.current_wave].shops)}
        pending.sort(key=lambda s: order.get(s.shop_id, 0))
        readings = self._readings([s.shop_id for s in pending]) if policy.windows.idle is not None else {}
        jobs: list[tuple[str, ReleaseSpec, int, FleetShop | None, str]] = []
        for s in pending:
            if in_flight >= policy.max_in_flight:
                break
            shop = fleet.get(s.shop_id)
            ok, why = window_open(policy.windows, shop.timezone if shop else "UTC", readings.get(s.shop_id, []), now)
            if not ok:
                continue
            if self._publish_shop(r.id, s.shop_id, spec, shop, now, expect="pending", purpose="rollout",
                                  values={"state": "applying", "started_at": now, "reason": f"window: {why}"}, defer=jobs):
                in_flight += 1
        self._send_all(jobs)

    def _readings(self, shop_ids: list[str]) -> dict[str, list[ReadingValue]]:
        out: dict[str, list[ReadingValue]] = defaultdict(list)
        with self.engine.connect() as conn:
            for row in conn.execute(
                select(LatestReading.shop_id, LatestReading.name, LatestReading.value, LatestReading.received_at).where(LatestReading.shop_id.in_(shop_ids))
            ):
                out[row.shop_id].append(ReadingValue(row.name, row.value, row.received_at))
        return out

    def _republish(self, r: Any, spec: ReleaseSpec, shops: list[Any], fleet: dict[str, FleetShop], now: float, *, force: bool) -> None:
        """Publish again the desired state of shops that have not reported on it (or all, after taking over)."""
        stale = [s for s in shops if s.state == "applying" and s.revision is not None]
        if not stale:
            return
        with self.engine.connect() as conn:
            published = dict(conn.execute(select(DESIRED.c.shop_id, DESIRED.c.published_at).where(DESIRED.c.shop_id.in_([s.shop_id for s in stale]))).all())
        reports = self._reports([s.shop_id for s in stale])
        for s in stale:
            rep = reports.get(s.shop_id)
            if rep is not None and rep.revision == s.revision:
                continue
            if force or now - published.get(s.shop_id, 0.0) > self.republish_after_s:
                self._send(s.shop_id, spec, s.revision, fleet.get(s.shop_id), "republish")
                with self.engine.begin() as conn:
                    conn.execute(update(DESIRED).where(DESIRED.c.shop_id == s.shop_id).values(published_at=now))

    def _publish_shop(
        self, rollout_id: int, shop_id: str, spec: ReleaseSpec, shop: FleetShop | None, now: float, *,
        expect: str, purpose: str, values: dict[str, Any], revision_column: str = "revision",
        defer: list[tuple[str, ReleaseSpec, int, FleetShop | None, str]] | None = None,
    ) -> bool:
        """Bump the shop's revision and move its row in one transaction, then publish; return whether it moved."""
        with self.engine.begin() as conn:
            cur = conn.execute(select(DESIRED.c.revision).where(DESIRED.c.shop_id == shop_id)).scalar()
            revision = (cur or 0) + 1
            moved = conn.execute(
                update(RSHOPS)
                .where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.shop_id == shop_id, RSHOPS.c.state == expect)
                .values(**{**values, revision_column: revision})
            ).rowcount
            if not moved:
                return False
            row = {"shop_id": shop_id, "revision": revision, "release": spec.name, "rollout_id": rollout_id, "published_at": now}
            stmt = _insert(conn, DESIRED).values(**row)
            conn.execute(stmt.on_conflict_do_update(index_elements=["shop_id"], set_={k: v for k, v in row.items() if k != "shop_id"}))
            log_event(conn, rollout_id, purpose, f"revision {revision}: {spec.name}", shop=shop_id, now=now)
        job = (shop_id, spec, revision, shop, purpose)
        if defer is None:
            self._send(*job)
        else:
            defer.append(job)
        return True

    def _send_all(self, jobs: list[tuple[str, ReleaseSpec, int, FleetShop | None, str]]) -> None:
        """Send deferred desired states concurrently: each publish waits for its broker acknowledgement."""
        if len(jobs) <= 1:
            for job in jobs:
                self._send(*job)
            return
        list(self._pool.map(lambda job: self._send(*job), jobs))

    def _send(self, shop_id: str, spec: ReleaseSpec, revision: int, shop: FleetShop | None, purpose: str) -> None:
        overlay = (shop.labels.get(OVERLAY_LABEL) if shop else None) or manifests.DEFAULT_EDGE_OVERLAY
        try:
            base = manifests.load_overlay(manifests.edge_overlay_dir(overlay, self.manifests_root))
            state = desired_state_for(shop_id, spec, revision, self.signer, node_classes=shop.node_classes if shop else frozenset(), base=base)
        except ValueError as exc:  # unknown overlay or invalid manifests: the apply timeout fails the shop with this in the log
            self.metrics.errors.labels("render").inc()
            log.error("cannot render revision %s for shop %s: %s", revision, shop_id, exc)
            return
        try:
            self.publish(Topics.desired(shop_id), encode(state), True, 1)
        except Exception as exc:
            self.metrics.errors.labels("publish").inc()
            log.warning("publishing revision %s to shop %s failed (will retry): %s", revision, shop_id, exc)
            return
        self.metrics.published.labels(purpose).inc()

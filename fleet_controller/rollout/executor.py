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
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from edge_agent.protocol import Topics, encode
from fleet_controller.registry.db import table_of
from fleet_controller.registry.maintenance import shops_in_maintenance
from fleet_controller.registry.read import RegistryReader
from fleet_controller.rollout import manifests
from fleet_controller.rollout.gates import NodeHealth, ReadingValue
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
from fleet_controller.rollout.step import (
    Action,
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
from fleet_controller.rollout.store import (
    DESIRED,
    OVERLAY_LABEL,
    ROLLOUTS,
    RSHOPS,
    load_fleet,
    log_event,
    record_failure,
)
from fleet_controller.settings import ExecutorSettings

log = logging.getLogger(__name__)

LEASE_NAME = "rollout-executor"
LEASES = table_of(ExecutorLease)

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
        self.reader = RegistryReader(engine)
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

    def _move(self, rollout_id: int, shop: str, expect: str, now: float, failure: MoveShop | None = None, **values: Any) -> bool:
        """Change one shop's row if it is still in state ``expect``; log the step (and ``failure``, for good); return whether it moved."""
        with self.engine.begin() as conn:
            n = conn.execute(
                update(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.shop_id == shop, RSHOPS.c.state == expect).values(**values)
            ).rowcount
            if n and "state" in values:
                log_event(conn, rollout_id, values["state"], values.get("reason", ""), shop=shop, now=now)
            if n and failure is not None and failure.gate is not None:
                record_failure(conn, rollout_id, shop, failure.gate, values.get("reason", ""), failure.value, failure.threshold, now)
        return n == 1

    def _set_rollout(self, rollout_id: int, now: float, kind: str, message: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id).values(updated_at=now, **values))
            log_event(conn, rollout_id, kind, message, now=now)
        log.info("rollout %s: %s: %s", rollout_id, kind, message)

    def _step(self, r: Any, now: float, *, resume: bool) -> None:
        """Read the rollout's state, decide with the pure :func:`~.step.step`, apply the actions."""
        state = self._load(r, now, resume=resume)
        self._apply(r.id, state, step(state))

    def _load(self, r: Any, now: float, *, resume: bool) -> StepInput:
        """Read everything one step of rollout ``r`` decides on (shop rows, specs, reports, health, readings)."""
        policy = RolloutPolicy.model_validate(r.policy)
        rollout = RolloutRow(r.id, r.release, r.status, r.current_wave, r.deadline_at, r.final_status)
        with self.engine.connect() as conn:
            rows = conn.execute(select(RSHOPS).where(RSHOPS.c.rollout_id == r.id)).all()
        shops = tuple(
            ShopRow(x.shop_id, x.wave, x.state, x.from_release, x.revision, x.rollback_revision, x.started_at,
                    x.applied_at, x.done_at, x.reason or "", x.baseline or {})
            for x in rows
        )
        specs: dict[str, ReleaseSpec | str] = {}
        for name in {r.release} | {x.from_release for x in shops if x.from_release}:
            try:
                specs[name] = self.releases.get(name)
            except ReleaseError as exc:
                specs[name] = str(exc)
        state = StepInput(rollout, policy, RolloutPlan.from_json(r.plan), shops, specs, now, self.republish_after_s, resume)
        if not isinstance(specs[r.release], ReleaseSpec):
            return state  # the step fails the rollout; nothing else is needed
        live = [x.shop_id for x in shops if x.state not in ("pending", "done", "skipped", "rolled_back")]
        pending = [x.shop_id for x in shops if x.state == "pending" and x.wave == r.current_wave]
        fleet: dict[str, FleetShop] = {}
        if any(x.state not in ("done", "skipped", "rolled_back") for x in shops):  # a shop that may be published to
            with self.engine.connect() as conn:
                fleet = {f.id: f for f in load_fleet(self.reader, conn)}
        published: dict[str, float] = {}
        applying = [x.shop_id for x in shops if x.state == "applying"]
        if applying:
            with self.engine.connect() as conn:
                published = dict(conn.execute(select(DESIRED.c.shop_id, DESIRED.c.published_at).where(DESIRED.c.shop_id.in_(applying))).all())
        return replace(
            state,
            fleet=fleet,
            reports=self.reader.reported_states(live),
            health=self._node_health([x.shop_id for x in shops if x.state in ("applying", "baking")]),
            readings=self._readings(pending) if policy.windows.idle is not None and pending else {},
            published_at=published,
            maintenance=shops_in_maintenance(self.engine, now) if pending else frozenset(),
        )

    def _apply(self, rollout_id: int, state: StepInput, actions: list[Action]) -> None:
        """Apply the step's actions in order: conditional updates, then the desired states to publish."""
        now = state.now
        jobs: list[tuple[str, ReleaseSpec, int, FleetShop | None, str]] = []
        for a in actions:
            if isinstance(a, MoveShop):
                if self._move(rollout_id, a.shop, a.expect, now, a, **a.values):
                    if a.gate is not None:
                        self.metrics.gate_failures.labels(a.gate).inc()
                        log.warning("rollout %s: shop %s failed (%s): %s", rollout_id, a.shop, a.gate, a.values.get("reason", ""))
                    if a.outcome is not None:
                        self.metrics.shops.labels(a.outcome).inc()
            elif isinstance(a, PublishDesired):
                spec = state.specs[a.release]
                assert isinstance(spec, ReleaseSpec)  # the step publishes only releases that loaded
                self._publish_shop(rollout_id, a.shop, spec, state.fleet.get(a.shop), now, expect=a.expect, purpose=a.purpose,
                                   values=dict(a.values), revision_column=a.revision_column, defer=jobs)
            elif isinstance(a, Republish):
                spec = state.specs[a.release]
                assert isinstance(spec, ReleaseSpec)
                self._send(a.shop, spec, a.revision, state.fleet.get(a.shop), "republish")
                with self.engine.begin() as conn:
                    conn.execute(update(DESIRED).where(DESIRED.c.shop_id == a.shop).values(published_at=now))
            elif isinstance(a, UpdateRollout):
                self._set_rollout(rollout_id, now, a.kind, a.message, **a.values)
            elif isinstance(a, HaltWave):
                self._halt_wave(rollout_id, a, now)
            elif isinstance(a, SkipPending):
                with self.engine.begin() as conn:
                    conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.state == "pending")
                                 .values(state="skipped", reason=a.reason))
        self._send_all(jobs)

    def _halt_wave(self, rollout_id: int, a: HaltWave, now: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(RSHOPS)
                .where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.wave == a.wave, RSHOPS.c.state.in_(("applying", "baking", "done", "failed")))
                .values(state="rolling_back", rollback_revision=None)
            )
            conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == rollout_id, RSHOPS.c.state == "pending").values(state="skipped", reason="rollout halted"))
            conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rollout_id).values(status="rolling_back", final_status="failed", reason=a.reason, updated_at=now))
            log_event(conn, rollout_id, "halted", f"{a.reason}; rolling the wave back", now=now)
        log.warning("rollout %s halted: %s", rollout_id, a.reason)

    def _node_health(self, shop_ids: list[str]) -> dict[str, list[NodeHealth]]:
        out: dict[str, list[NodeHealth]] = defaultdict(list)
        for n in self.reader.node_states(shop_ids):
            out[n.shop].append(NodeHealth(n.node, n.presence, n.facts_at, n.pipelines, n.metrics))
        return out

    def _readings(self, shop_ids: list[str]) -> dict[str, list[ReadingValue]]:
        out: dict[str, list[ReadingValue]] = defaultdict(list)
        for r in self.reader.readings(shops=shop_ids):
            out[r.shop].append(ReadingValue(r.name, r.value, r.received_at))
        return out

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

"""One executor step of one rollout, as a pure function: what the rollout looks like -> what to do.

:func:`step` takes a :class:`StepInput` (the rollout's row and shop rows, the release specs, the
shops' reports, node health and readings, the clock) and returns the :class:`Action` values the
executor (:mod:`.executor`) then applies: conditional row updates, signed desired states to
publish, rollout status changes. Nothing here touches the database or MQTT, so every decision
(gates, windows, ``max_in_flight``, deadlines, halting and rolling back a failed wave) is
testable with plain values, and the applier stays a thin loop of SQL and publishes.

Within a step the phases run in order (re-publish after a takeover, track applies, bakes and
rollbacks, halt a failed wave, advance), and each phase sees the shop rows as the earlier ones
left them, exactly as if every move had already been committed. The executor applies each move
as a conditional update (``... WHERE state = <expected>``), so a second executor that overlapped
this one still cannot move a shop twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fleet_controller.registry.read import ReportedStateView
from fleet_controller.rollout.gates import NodeHealth, ReadingValue, evaluate_gates, window_open
from fleet_controller.rollout.planner import FleetShop, RolloutPlan
from fleet_controller.rollout.policy import RolloutPolicy
from fleet_controller.rollout.releases import ReleaseSpec

MAINTENANCE_HOLD = "held: shop in maintenance"
"""Reason of a pending shop the executor does not start because an operator put it in maintenance."""

PUBLISHING = 0
"""Stands in, within one step, for the revision a desired state is about to get (real revisions
start at 1): the executor bumps the stored counter when it applies the action."""


@dataclass(frozen=True)
class RolloutRow:
    """A rollout as stored."""

    id: int
    release: str
    status: str
    current_wave: int
    deadline_at: float | None
    final_status: str | None


@dataclass(frozen=True)
class ShopRow:
    """One shop's progress in a rollout, as stored."""

    shop_id: str
    wave: int
    state: str
    from_release: str | None = None
    revision: int | None = None
    rollback_revision: int | None = None
    started_at: float | None = None
    applied_at: float | None = None
    done_at: float | None = None
    reason: str = ""
    baseline: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepInput:
    """Everything one step of one rollout decides on."""

    rollout: RolloutRow
    policy: RolloutPolicy
    plan: RolloutPlan
    shops: tuple[ShopRow, ...]
    specs: Mapping[str, ReleaseSpec | str]  # release name -> its spec, or why it cannot be loaded
    now: float
    republish_after_s: float
    resume: bool = False  # this controller just became the executor: re-publish everything in flight
    fleet: Mapping[str, FleetShop] = field(default_factory=dict)
    reports: Mapping[str, ReportedStateView] = field(default_factory=dict)
    health: Mapping[str, Sequence[NodeHealth]] = field(default_factory=dict)
    readings: Mapping[str, Sequence[ReadingValue]] = field(default_factory=dict)
    published_at: Mapping[str, float] = field(default_factory=dict)  # when each shop's desired state was last published
    maintenance: frozenset[str] = frozenset()  # shops in maintenance: no new update starts there (a rollback still does)


# ----- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoveShop:
    """Change a shop's row if it is still in state ``expect``; a ``state`` among ``values`` is logged as a rollout event.

    ``outcome`` (done, failed, rolled_back) and ``gate`` (the gate that failed it) are counted
    when the row moved; with a ``gate``, the executor also records the failure (gate, ``value``,
    ``threshold``, reason) for good, since the shop's own reason changes as it is rolled back.
    """

    shop: str
    expect: str
    values: Mapping[str, Any]
    outcome: str | None = None
    gate: str | None = None
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class PublishDesired:
    """Bump the shop's desired revision and move its row (if still ``expect``) in one transaction, then publish ``release``."""

    shop: str
    release: str
    expect: str
    purpose: str  # rollout or rollback
    values: Mapping[str, Any]
    revision_column: str = "revision"


@dataclass(frozen=True)
class Republish:
    """Publish the shop's current desired revision again (it has not reported on it)."""

    shop: str
    release: str
    revision: int


@dataclass(frozen=True)
class UpdateRollout:
    """Change the rollout's row and log ``kind: message`` as a rollout event."""

    kind: str
    message: str
    values: Mapping[str, Any]


@dataclass(frozen=True)
class HaltWave:
    """A shop of ``wave`` failed: roll the wave back, skip every pending shop, mark the rollout rolling back."""

    wave: int
    reason: str


@dataclass(frozen=True)
class SkipPending:
    """Mark every pending shop of the rollout skipped, with ``reason``."""

    reason: str


Action = MoveShop | PublishDesired | Republish | UpdateRollout | HaltWave | SkipPending


# ----- the step -----------------------------------------------------------------------------------


class _Step:
    """The working state of one :func:`step` call: shop rows as moved so far, and the actions taken."""

    def __init__(self, s: StepInput) -> None:
        self.s = s
        self.r = s.rollout
        self.shops: dict[str, ShopRow] = {row.shop_id: row for row in s.shops}
        self.actions: list[Action] = []

    def rows(self) -> list[ShopRow]:
        return list(self.shops.values())

    def _set(self, shop: str, expect: str, values: Mapping[str, Any]) -> bool:
        row = self.shops.get(shop)
        if row is None or row.state != expect:
            return False
        self.shops[shop] = replace(row, **values)
        return True

    def move(self, shop: str, expect: str, outcome: str | None = None, gate: str | None = None,
             measured: tuple[float | None, float | None] = (None, None), **values: Any) -> bool:
        if not self._set(shop, expect, values):
            return False
        self.actions.append(MoveShop(shop, expect, values, outcome, gate, *measured))
        return True

    def fail(self, shop: str, expect: str, gate: str, reason: str, value: float | None = None, threshold: float | None = None) -> None:
        self.move(shop, expect, outcome="failed", gate=gate, measured=(value, threshold), state="failed", done_at=self.s.now, reason=reason)

    def publish(self, shop: str, release: str, *, expect: str, purpose: str, values: Mapping[str, Any],
                revision_column: str = "revision") -> bool:
        if not self._set(shop, expect, {**values, revision_column: PUBLISHING}):
            return False
        self.actions.append(PublishDesired(shop, release, expect, purpose, values, revision_column))
        return True

    # ----- phases ---------------------------------------------------------------------------------

    def republish(self, *, force: bool) -> None:
        """Publish again the desired state of shops that have not reported on it (or all, after taking over)."""
        now = self.s.now
        for row in self.rows():
            if row.state != "applying" or row.revision is None:
                continue
            rep = self.s.reports.get(row.shop_id)
            if rep is not None and rep.revision == row.revision:
                continue
            if force or now - self.s.published_at.get(row.shop_id, 0.0) > self.s.republish_after_s:
                self.actions.append(Republish(row.shop_id, self.r.release, row.revision))

    def track_apply(self) -> None:
        now, policy = self.s.now, self.s.policy
        for row in self.rows():
            if row.state != "applying" or row.revision is None:
                continue
            rep = self.s.reports.get(row.shop_id)
            if rep is not None and rep.revision == row.revision and rep.status in ("applied", "failed", "refused"):
                if rep.status == "applied":
                    self.move(row.shop_id, "applying", state="baking", applied_at=now, reason="applied; baking")
                else:
                    self.fail(row.shop_id, "applying", "apply", f"shop reported {rep.status}: {rep.error}")
            elif now - (row.started_at or now) > policy.apply_timeout_s:
                self.fail(row.shop_id, "applying", "apply_timeout", f"no apply report within {policy.apply_timeout_s:.0f}s",
                          now - (row.started_at or now), policy.apply_timeout_s)

    def track_bake(self) -> None:
        now, policy = self.s.now, self.s.policy
        for row in self.rows():
            if row.state != "baking":
                continue
            v = evaluate_gates(policy.gates, self.s.health.get(row.shop_id, []), row.applied_at or now, row.baseline or {}, now)
            if v.state == "fail":
                self.fail(row.shop_id, "baking", v.gate, f"gate {v.gate}: {v.reason}", v.value, v.threshold)
                continue
            baked = now - (row.applied_at or now) >= policy.bake_time_s
            if v.state == "pass" and baked and "errors" in (row.baseline or {}):
                self.move(row.shop_id, "baking", outcome="done", state="done", done_at=now, reason="healthy through bake time")
            elif v.state == "wait" and now - (row.applied_at or now) > policy.bake_time_s + policy.apply_timeout_s:
                self.fail(row.shop_id, "baking", "no_health", f"no fresh health: {v.reason}")
            elif dict(v.baseline) != dict(row.baseline or {}):
                self.move(row.shop_id, "baking", baseline=dict(v.baseline))

    def track_rollback(self) -> None:
        now, policy = self.s.now, self.s.policy
        for row in self.rows():
            if row.state != "rolling_back":
                continue
            if row.rollback_revision is None:
                self.publish_rollback(row)
                continue
            rep = self.s.reports.get(row.shop_id)
            if rep is not None and rep.revision == row.rollback_revision and rep.status == "applied":
                self.move(row.shop_id, "rolling_back", outcome="rolled_back", state="rolled_back", done_at=now,
                          reason=f"back on {row.from_release}")
            elif rep is not None and rep.revision == row.rollback_revision and rep.status in ("failed", "refused"):
                self.move(row.shop_id, "rolling_back", state="failed", done_at=now, reason=f"rollback {rep.status}: {rep.error}")
            elif now - (row.done_at or row.started_at or now) > policy.apply_timeout_s:
                self.move(row.shop_id, "rolling_back", state="failed", done_at=now, reason="rollback not confirmed in time")

    def publish_rollback(self, row: ShopRow) -> None:
        now = self.s.now
        if not row.from_release:
            self.move(row.shop_id, "rolling_back", state="failed", done_at=now,
                      reason=f"no previous release to return to; still on {self.r.release}")
            return
        spec = self.s.specs.get(row.from_release, f"release {row.from_release!r} was not loaded")
        if not isinstance(spec, ReleaseSpec):
            self.move(row.shop_id, "rolling_back", state="failed", done_at=now, reason=spec)
            return
        self.publish(row.shop_id, spec.name, expect="rolling_back", purpose="rollback",
                     values={"rollback_revision": None, "done_at": now}, revision_column="rollback_revision")

    def wave_failed(self) -> bool:
        """If a shop of the current wave failed, roll the wave back and halt; return whether it did."""
        wave = [row for row in self.rows() if row.wave == self.r.current_wave]
        failed = [row for row in wave if row.state == "failed" and row.revision is not None]
        if not failed:
            return False
        first = failed[0]
        reason = f"wave {self.r.current_wave} failed: {first.shop_id}: {first.reason}"
        for row in self.rows():
            if row.wave == self.r.current_wave and row.state in ("applying", "baking", "done", "failed"):
                self.shops[row.shop_id] = replace(row, state="rolling_back", rollback_revision=None)
            elif row.state == "pending":
                self.shops[row.shop_id] = replace(row, state="skipped", reason="rollout halted")
        self.actions.append(HaltWave(self.r.current_wave, reason))
        return True

    def advance(self, spec: ReleaseSpec) -> None:
        now, policy, plan, r = self.s.now, self.s.policy, self.s.plan, self.r
        rows = self.rows()
        wave = [row for row in rows if row.wave == r.current_wave]
        if wave and all(row.state in ("done", "skipped") for row in wave):
            nxt = r.current_wave + 1
            if nxt >= len(plan.waves):
                self.actions.append(UpdateRollout("completed", f"all {len(plan.waves)} waves done",
                                                  {"status": "completed", "current_wave": nxt}))
            else:
                self.actions.append(UpdateRollout(
                    "wave", f"wave {plan.waves[r.current_wave].name} done; starting {plan.waves[nxt].name}", {"current_wave": nxt}))
            return
        in_flight = sum(1 for row in rows if row.state in ("applying", "baking"))
        pending = [row for row in wave if row.state == "pending"]
        if not pending:
            return
        if r.deadline_at is not None and now > r.deadline_at:
            self.actions.append(SkipPending("deadline passed"))
            if in_flight == 0:
                self.actions.append(UpdateRollout("expired", "deadline passed before every shop was started",
                                                  {"status": "expired", "reason": "deadline passed"}))
            return
        order = {shop: i for i, shop in enumerate(plan.waves[r.current_wave].shops)}
        pending.sort(key=lambda row: order.get(row.shop_id, 0))
        for row in pending:
            if in_flight >= policy.max_in_flight:
                break
            if row.shop_id in self.s.maintenance:
                # Held like a closed window: the shop keeps its place in the wave and starts when
                # the maintenance ends. The reason says why it waits (written once, not every step).
                if row.reason != MAINTENANCE_HOLD:
                    self.move(row.shop_id, "pending", reason=MAINTENANCE_HOLD)
                continue
            shop = self.s.fleet.get(row.shop_id)
            ok, why = window_open(policy.windows, shop.timezone if shop else "UTC", self.s.readings.get(row.shop_id, []), now)
            if not ok:
                continue
            if self.publish(row.shop_id, spec.name, expect="pending", purpose="rollout",
                            values={"state": "applying", "started_at": now, "reason": f"window: {why}"}):
                in_flight += 1


def step(s: StepInput) -> list[Action]:
    """Return what one executor step of ``s.rollout`` does, in the order to apply it (pure)."""
    st = _Step(s)
    r = s.rollout
    spec = s.specs.get(r.release, f"release {r.release!r} was not loaded")
    if not isinstance(spec, ReleaseSpec):
        return [UpdateRollout("failed", spec, {"status": "failed", "reason": spec})]
    if s.resume:
        st.republish(force=True)
    st.track_apply()
    st.track_bake()
    st.track_rollback()
    if r.status in ("running", "paused") and st.wave_failed():
        st.track_rollback()
        return st.actions
    if r.status == "running":
        st.republish(force=False)
        st.advance(spec)
    elif r.status == "rolling_back" and not any(row.state == "rolling_back" for row in st.rows()):
        final = r.final_status or "failed"
        st.actions.append(UpdateRollout(final, f"rollback finished; rollout {final}", {"status": final}))
    return st.actions

"""The desired-state handler the agent calls: verify, diff, apply, wait, prune, report.

It is synchronous on purpose: the ``kubernetes`` client blocks, so the agent runs
:meth:`DesiredStateHandler.handle` in a worker thread and never on its event loop. Every outcome
becomes an :class:`ApplyReport` handed to ``report`` (the agent turns it into a retained
``ReportedState`` through its outbox): ``applying`` first, then ``applied``/``failed`` with
per-object status, or ``refused`` with the reason for a message it must not apply. A bad message
never raises out of :meth:`handle`; it is logged once, counted by reason, and reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.apply.cluster import ClusterClient
from edge_agent.apply.diff import ObjectRef, diff, workload_ready
from edge_agent.apply.errors import ApplyFailed, ClusterUnavailable, StateRefused, StateStoreCorrupt
from edge_agent.apply.verify import AppliedRecord, RevisionStore, Verifier, check_admissible
from edge_agent.protocol import DesiredState, ObjectStatus, ReportedState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyReport:
    """The content of a ReportedState, before the outbox gives it an epoch and a seq."""

    release: str | None
    revision: int
    status: str  # applying | applied | failed | refused
    error: str = ""
    objects: tuple[ObjectStatus, ...] = field(default_factory=tuple)

    def to_message(self, shop: str, node: str, epoch: str, seq: int) -> ReportedState:
        """Return the wire message for this report."""
        return ReportedState(
            shop=shop,
            node=node,
            epoch=epoch,
            seq=seq,
            release=self.release,
            revision=self.revision,
            status=self.status,  # type: ignore[arg-type]
            error=self.error[:2000],
            objects=self.objects,
        )


class ApplyMetrics:
    """Prometheus metrics of the apply path, on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "shopfleet_agent_apply_total", "Desired states handled, by outcome (applied, unchanged, failed, refused).", ["outcome"], registry=registry
        )
        self.refused = Counter(
            "shopfleet_agent_apply_refused_total", "Desired states refused, by reason (unsigned, forged, replay, ...).", ["reason"], registry=registry
        )
        self.duration = Histogram("shopfleet_agent_apply_duration_seconds", "Time from a verified desired state to its final report.", registry=registry)
        self.revision = Gauge("shopfleet_agent_applied_revision", "Revision of the desired state last applied successfully.", registry=registry)


def _status(ref: ObjectRef, status: str, message: str = "") -> ObjectStatus:
    return ObjectStatus(api_version=ref.api_version, kind=ref.kind, namespace=ref.namespace, name=ref.name, status=status, message=message[:1000])  # type: ignore[arg-type]


class DesiredStateHandler:
    """Verify and apply desired states for one shop, one at a time."""

    def __init__(
        self,
        shop: str,
        verifier: Verifier,
        store: RevisionStore,
        client: ClusterClient,
        report: Callable[[ApplyReport], None],
        *,
        metrics: ApplyMetrics,
        ready_timeout_s: float = 300.0,
        poll_interval_s: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shop = shop
        self._verifier = verifier
        self._store = store
        self._client = client
        self._report = report
        self._metrics = metrics
        self._ready_timeout_s = ready_timeout_s
        self._poll_interval_s = poll_interval_s
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        try:
            last = store.load()
        except StateStoreCorrupt:
            last = AppliedRecord()  # handle() reports the problem on the first message
        if last.status == "applied":
            metrics.revision.set(last.revision)

    def handle(self, state: DesiredState) -> ApplyReport:
        """Verify, apply and report ``state``; return the final report. Never raises for a bad message."""
        with self._lock:
            try:
                last = self._store.load()
                if not check_admissible(state, self.shop, last, self._verifier):
                    self._metrics.outcomes.labels("unchanged").inc()
                    final = ApplyReport(state.release, state.revision, "applied", "already applied")
                    self._report(final)
                    return final
            except StateStoreCorrupt as exc:  # refuse everything until an operator fixes the file
                log.error("cannot check desired state revision %s: %s", state.revision, exc)
                self._metrics.refused.labels("state_store").inc()
                self._metrics.outcomes.labels("refused").inc()
                final = ApplyReport(state.release, state.revision, "refused", f"state_store: {exc}")
                self._report(final)
                return final
            except StateRefused as exc:
                log.warning("refusing desired state revision %s for shop %s: %s", state.revision, state.shop, exc)
                self._metrics.refused.labels(exc.reason).inc()
                self._metrics.outcomes.labels("refused").inc()
                final = ApplyReport(state.release, state.revision, "refused", f"{exc.reason}: {exc.detail}")
                self._report(final)
                return final
            started = self._clock()
            self._report(ApplyReport(state.release, state.revision, "applying"))
            final = self._apply(state)
            self._store.save(AppliedRecord(state.revision, state.release, final.status))
            self._metrics.outcomes.labels(final.status).inc()
            self._metrics.duration.observe(self._clock() - started)
            if final.status == "applied":
                self._metrics.revision.set(state.revision)
            log.info("shop %s revision %s (%s): %s %s", self.shop, state.revision, state.release, final.status, final.error)
            self._report(final)
            return final

    def _apply(self, state: DesiredState) -> ApplyReport:
        try:
            live = self._client.list_managed(self.shop)
        except ClusterUnavailable as exc:
            return ApplyReport(state.release, state.revision, "failed", f"cluster unavailable: {exc}")
        plan = diff(state.objects, live)
        statuses: dict[ObjectRef, ObjectStatus] = {ref: _status(ref, "ready", "unchanged") for ref in plan.unchanged}
        failed: list[str] = []
        for obj in plan.apply:
            ref = ObjectRef.of(obj)
            try:
                self._client.apply(obj)
                statuses[ref] = _status(ref, "applied")
            except (ApplyFailed, ClusterUnavailable) as exc:
                statuses[ref] = _status(ref, "failed", str(exc))
                failed.append(str(ref))
        if failed:
            # Keep what runs: no prune, no wait. The controller rolls back if it must.
            return ApplyReport(state.release, state.revision, "failed", f"rejected: {', '.join(failed)}", self._ordered(state, statuses))
        not_ready = self._wait_ready([ObjectRef.of(o) for o in state.objects], statuses)
        for ref in plan.prune:
            try:
                self._client.delete(ref)
                statuses[ref] = _status(ref, "pruned")
            except (ApplyFailed, ClusterUnavailable) as exc:
                statuses[ref] = _status(ref, "failed", f"prune: {exc}")
                failed.append(str(ref))
        objects = self._ordered(state, statuses) + tuple(statuses[r] for r in plan.prune)
        if not_ready:
            return ApplyReport(state.release, state.revision, "failed", f"not ready after {self._ready_timeout_s:.0f}s: {', '.join(not_ready)}", objects)
        if failed:
            return ApplyReport(state.release, state.revision, "failed", f"prune failed: {', '.join(failed)}", objects)
        return ApplyReport(state.release, state.revision, "applied", "", objects)

    @staticmethod
    def _ordered(state: DesiredState, statuses: dict[ObjectRef, ObjectStatus]) -> tuple[ObjectStatus, ...]:
        return tuple(statuses[ObjectRef.of(o)] for o in state.objects if ObjectRef.of(o) in statuses)

    def _ready(self, ref: ObjectRef) -> tuple[bool, str]:
        try:
            live: dict[str, Any] | None = self._client.get(ref)
        except ClusterUnavailable as exc:
            return False, f"cluster unavailable: {exc}"
        return workload_ready(live) if live is not None else (False, "not found")

    def _wait_ready(self, refs: list[ObjectRef], statuses: dict[ObjectRef, ObjectStatus]) -> list[str]:
        """Poll workloads until ready or the deadline; return the names still not ready."""
        pending = [r for r in refs if r.kind in ("DaemonSet", "Deployment")]
        deadline = self._clock() + self._ready_timeout_s
        while True:
            still: list[ObjectRef] = []
            for ref in pending:
                ready, why = self._ready(ref)
                statuses[ref] = _status(ref, "ready" if ready else "pending", why)
                if not ready:
                    still.append(ref)
            pending = still
            if not pending or self._clock() >= deadline:
                return [str(r) for r in pending]
            self._sleep(self._poll_interval_s)

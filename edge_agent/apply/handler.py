"""The desired-state handler the agent calls: verify, dry-run, apply, wait, prune, report.

It is synchronous on purpose: the ``kubernetes`` client blocks, so the agent runs
:meth:`DesiredStateHandler.handle` in a worker thread and never on its event loop. Every outcome
becomes an :class:`ApplyReport` handed to ``report`` (the agent turns it into a retained
``ReportedState`` through its outbox): ``applying`` first, ``retrying`` while the cluster API is
unavailable, then ``applied``/``failed`` with per-object status, or ``refused`` with the reason
for a message it must not apply. A bad message never raises out of :meth:`handle`; it is logged
once, counted by reason, and reported.

The order of one apply, chosen so that a shop never runs two releases mixed:

1. **dry run** of every changed object (``dryRun=All``): the API server validates and admits
   the whole set before the first write. Objects that cannot be checked yet (in a namespace, or
   of a kind, that this same set creates) are checked right after step 2;
2. **foundations**: Namespaces and CRDs, then wait until each CRD is ``Established``;
3. **the rest**, in dependency order, the agent's own DaemonSet last;
4. **wait** until every workload is updated and available (``ProgressDeadlineExceeded`` fails
   at once); before replacing its own pod the agent has persisted the state and the record
   ``applying``, so the new pod resumes (:meth:`resume`) where the old one stopped;
5. **prune** objects of older revisions, only now that the new set is ready, never a Namespace,
   a CRD or the agent's own DaemonSet.

Every API call is retried on ``ClusterUnavailable`` (429 with its ``Retry-After``, 409, 5xx,
timeouts, connection errors) with exponential backoff and jitter until the apply's deadline; past
it the revision is stored and reported as ``retrying`` (never ``failed``) and :meth:`reconcile`
takes it up again. :meth:`reconcile`, run periodically, also corrects drift: an object whose
fields no longer match what was applied (a hand edit, a deleted object) is applied again and
counted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_agent.apply.cluster import ClusterClient
from edge_agent.apply.diff import (
    FOUNDATION_KINDS,
    WORKLOAD_KINDS,
    ObjectRef,
    Readiness,
    contains,
    desired_with_hash,
    diff,
    readiness,
)
from edge_agent.apply.errors import (
    ApplyFailed,
    ClusterUnavailable,
    ObjectNotFound,
    SignatureInvalid,
    StateRefused,
    StateStoreCorrupt,
    UnknownKind,
)
from edge_agent.apply.model_fetch import ModelRejected, ModelStager
from edge_agent.apply.verify import (
    AppliedRecord,
    HighWater,
    RevisionStore,
    Verifier,
    check_admissible,
)
from edge_agent.protocol import ERROR_MAX_CHARS, DesiredState, ObjectStatus, ReportedState

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ApplyReport:
    """The content of a ReportedState, before the outbox gives it an epoch and a seq."""

    release: str | None
    revision: int
    status: str  # applying | retrying | applied | failed | refused
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
            status=self.status,
            error=self.error[:ERROR_MAX_CHARS],
            objects=self.objects,
        )


class ApplyMetrics:
    """Prometheus metrics of the apply path, on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "shopfleet_agent_apply_total", "Desired states handled, by outcome (applied, unchanged, failed, refused, retrying).", ["outcome"],
            registry=registry,
        )
        self.refused = Counter(
            "shopfleet_agent_apply_refused_total", "Desired states refused, by reason (unsigned, forged, replay, ...).", ["reason"], registry=registry
        )
        self.duration = Histogram("shopfleet_agent_apply_duration_seconds", "Time from a verified desired state to its final report.", registry=registry)
        self.revision = Gauge("shopfleet_agent_applied_revision", "Revision of the desired state last applied successfully.", registry=registry)
        self.retries = Counter(
            "shopfleet_agent_apply_retries_total", "Cluster API calls retried, by reason (throttled, conflict, server_error, connection, ...).",
            ["reason"], registry=registry,
        )
        self.drift_corrected = Counter(
            "shopfleet_agent_apply_drift_corrected_total", "Objects re-applied because the live object had drifted from the applied one, by kind.",
            ["kind"], registry=registry,
        )
        self.drift_checks = Counter(
            "shopfleet_agent_apply_drift_checks_total", "Periodic drift checks, by outcome (clean, corrected, error).", ["outcome"], registry=registry
        )


class RetryDeadlineExceeded(ClusterUnavailable):
    """The cluster stayed unavailable until the apply's deadline; the revision is left ``retrying``."""

    default_reason = "retry_deadline"


def _status(ref: ObjectRef, status: str, message: str = "") -> ObjectStatus:
    return ObjectStatus(api_version=ref.api_version, kind=ref.kind, namespace=ref.namespace, name=ref.name, status=status, message=message[:1000])


def _crd_kind(obj: dict[str, Any]) -> tuple[str, str]:
    spec = obj.get("spec") or {}
    return str(spec.get("group", "")), str((spec.get("names") or {}).get("kind", ""))


def _group(api_version: str) -> str:
    return api_version.split("/", 1)[0] if "/" in api_version else ""


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
        retry_deadline_s: float = 600.0,
        retry_min_s: float = 1.0,
        retry_max_s: float = 30.0,
        self_ref: ObjectRef | None = None,
        models: ModelStager | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.shop = shop
        self._verifier = verifier
        self._store = store
        self._client = client
        self._report = report
        self._metrics = metrics
        self._ready_timeout_s = ready_timeout_s
        self._poll_interval_s = poll_interval_s
        self._retry_deadline_s = retry_deadline_s
        self._retry_min_s = retry_min_s
        self._retry_max_s = retry_max_s
        self._self_ref = self_ref
        self._models = models
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._lock = threading.Lock()
        self._deadline = 0.0
        self._current: DesiredState | None = None
        self._retrying = False
        self.high_water = HighWater(store.seen_path)
        try:
            last = store.load()
        except StateStoreCorrupt:
            last = AppliedRecord()  # handle() reports the problem on the first message
        if last.status == "applied":
            metrics.revision.set(last.revision)

    # ----- entry points -----------------------------------------------------------------------

    def observe(self, state: DesiredState) -> bool:
        """Learn from a received desired state (any thread); return False if it must not replace a newer one.

        A validly signed state raises the high-water mark, so the shop's retained desired state
        teaches the agent the newest revision as soon as it connects. A signed state below the
        mark is a replay: it is reported refused here (no cluster call, no lock: safe on the MQTT
        thread) and False tells the caller to keep what it has. An unsigned or forged one is
        refused the same way and never raises the mark: nothing invalid displaces a valid state
        waiting to be applied.
        """
        if state.shop != self.shop:
            return True  # handle() refuses it as wrong_shop
        try:
            self._verifier.verify(state)
        except SignatureInvalid as exc:
            log.warning("refusing desired state revision %s for shop %s: %s", state.revision, state.shop, exc)
            self._refuse(state, exc.reason, f"{exc.reason}: {exc.detail}")
            return False
        highest = self.high_water.value
        if state.revision < highest:
            log.warning("shop %s: refusing signed revision %s, older than revision %s already received (a replay)",
                        self.shop, state.revision, highest)
            self._refuse(state, "replay", f"replay: revision {state.revision} is older than signed revision {highest} already received")
            return False
        self.high_water.raise_to(state.revision)
        return True

    def handle(self, state: DesiredState) -> ApplyReport:
        """Verify, apply and report ``state``; return the final report. Never raises for a bad message."""
        with self._lock:
            try:
                last = self._store.load()
                if not check_admissible(state, self.shop, last, self._verifier, self.high_water.value):
                    self._metrics.outcomes.labels("unchanged").inc()
                    final = ApplyReport(state.release, state.revision, "applied", "already applied")
                    self._report(final)
                    return final
            except StateStoreCorrupt as exc:  # refuse everything until an operator fixes the file
                log.error("cannot check desired state revision %s: %s", state.revision, exc)
                return self._refuse(state, "state_store", f"state_store: {exc}")
            except StateRefused as exc:
                log.warning("refusing desired state revision %s for shop %s: %s", state.revision, state.shop, exc)
                return self._refuse(state, exc.reason, f"{exc.reason}: {exc.detail}")
            self.high_water.raise_to(state.revision)
            started = self._clock()
            self._report(ApplyReport(state.release, state.revision, "applying"))
            # Persisted before the first write: a restart (or the agent replacing its own pod)
            # finds "applying" and the state to resume from.
            self._store.save_state(state)
            self._store.save(AppliedRecord(state.revision, state.release, "applying"))
            final = self._run(state)
            self._store.save(AppliedRecord(state.revision, state.release, final.status))
            self._metrics.outcomes.labels(final.status).inc()
            self._metrics.duration.observe(self._clock() - started)
            if final.status == "applied":
                self._metrics.revision.set(state.revision)
                if self._models is not None:
                    self._models.mark_applied(state.model)
            log.info("shop %s revision %s (%s): %s %s", self.shop, state.revision, state.release, final.status, final.error)
            self._report(final)
            return final

    def resume(self) -> ApplyReport | None:
        """Finish an apply a previous process started (``applying``/``retrying``); None if there is none."""
        try:
            last = self._store.load()
        except StateStoreCorrupt:
            return None
        state = self._store.load_state() if last.unfinished else None
        if state is None or state.revision != last.revision:
            return None
        log.info("shop %s: resuming revision %s (%s), left %s", self.shop, state.revision, state.release, last.status)
        return self.handle(state)  # verified again: the file on disk grants no trust

    def correct_drift(self) -> list[ObjectRef]:
        """Re-apply every object of the applied revision whose live copy drifted; return what changed.

        Only objects whose fields differ (or that are gone) are applied again, and one is counted
        as corrected only if the API server actually changed it (its ``resourceVersion`` moved),
        so a value the server merely normalises is not counted every interval.
        """
        with self._lock:
            try:
                last = self._store.load()
            except StateStoreCorrupt:
                return []
            state = self._store.load_state()
            if last.status != "applied" or state is None or state.revision != last.revision:
                return []
            try:
                self._verifier.verify(state)
            except StateRefused as exc:
                log.error("not correcting drift: the stored desired state does not verify (%s)", exc)
                self._metrics.drift_checks.labels("error").inc()
                return []
            corrected: list[ObjectRef] = []
            try:
                for obj in state.objects:
                    want = desired_with_hash(obj)
                    ref = ObjectRef.of(want)
                    live = self._client.get(ref)
                    if live is not None and contains(live, want):
                        continue
                    before = ((live or {}).get("metadata") or {}).get("resourceVersion")
                    after = (self._client.apply(want).get("metadata") or {}).get("resourceVersion")
                    if live is None or after != before:
                        log.warning("shop %s: %s drifted from revision %s; re-applied", self.shop, ref, state.revision)
                        self._metrics.drift_corrected.labels(ref.kind).inc()
                        corrected.append(ref)
            except (ClusterUnavailable, ApplyFailed) as exc:
                log.warning("shop %s: drift check stopped (%s); next interval tries again", self.shop, exc)
                self._metrics.drift_checks.labels("error").inc()
                return corrected
            self._metrics.drift_checks.labels("corrected" if corrected else "clean").inc()
            return corrected

    def reconcile(self) -> None:
        """The periodic pass: finish an unfinished apply, else correct drift."""
        if self.resume() is None:
            self.correct_drift()

    def run_reconciler(self, stop: threading.Event, interval_s: float) -> None:
        """Call :meth:`reconcile` now and every ``interval_s`` until ``stop`` is set (run in a thread)."""
        while not stop.is_set():
            try:
                self.reconcile()
            except Exception:  # a bug here must not end the loop that repairs the shop
                log.exception("shop %s: reconcile failed; trying again next interval", self.shop)
            stop.wait(interval_s)

    # ----- one apply --------------------------------------------------------------------------

    def _refuse(self, state: DesiredState, reason: str, error: str) -> ApplyReport:
        self._metrics.refused.labels(reason).inc()
        self._metrics.outcomes.labels("refused").inc()
        final = ApplyReport(state.release, state.revision, "refused", error)
        self._report(final)
        return final

    def _run(self, state: DesiredState) -> ApplyReport:
        self._deadline = self._clock() + self._retry_deadline_s
        self._current = state
        self._retrying = False
        try:
            if self._models is not None and state.model:
                # Staged before the first write: a model that cannot be fetched or verified leaves the cluster untouched.
                self._retry(f"fetch model {state.model.get('name', '?')}", self._models.ensure, state.model)
            return self._apply(state)
        except ModelRejected as exc:
            self._metrics.refused.labels("model").inc()
            log.error("shop %s revision %s: model refused: %s", self.shop, state.revision, exc)
            return ApplyReport(state.release, state.revision, "refused",
                               f"model {exc.reason}: {exc}; nothing applied, the shop keeps running its current release")
        except RetryDeadlineExceeded as exc:
            return ApplyReport(state.release, state.revision, "retrying", f"{exc}; the agent tries again later")

    def _retry(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn`` until it does not raise ``ClusterUnavailable`` or the apply's deadline passes."""
        attempt = 0
        while True:
            try:
                result = fn(*args)
            except ClusterUnavailable as exc:
                attempt += 1
                self._metrics.retries.labels(exc.reason).inc()
                backoff = min(self._retry_max_s, self._retry_min_s * 2 ** (attempt - 1)) * (0.5 + self._jitter() / 2)
                delay = exc.retry_after if exc.retry_after is not None else backoff
                if self._clock() + delay > self._deadline:
                    raise RetryDeadlineExceeded(f"{what}: cluster unavailable after {attempt} attempts: {exc}", status=exc.status) from None
                log.warning("shop %s: %s: %s; retry %d in %.1fs", self.shop, what, exc, attempt, delay)
                if not self._retrying and self._current is not None:
                    self._retrying = True
                    self._report(ApplyReport(self._current.release, self._current.revision, "retrying", f"{what}: {exc}"))
                self._sleep(delay)
                continue
            if self._retrying and self._current is not None:
                self._retrying = False
                self._report(ApplyReport(self._current.release, self._current.revision, "applying"))
            return result

    def _apply(self, state: DesiredState) -> ApplyReport:
        rel, rev = state.release, state.revision
        live = self._retry("list managed objects", self._client.list_managed, self.shop, state.objects)
        protect = (self._self_ref,) if self._self_ref is not None else ()
        plan = diff(state.objects, live, protect=protect)
        statuses: dict[ObjectRef, ObjectStatus] = {ref: _status(ref, "ready", "unchanged") for ref in plan.unchanged}
        new_namespaces = {o["metadata"]["name"] for o in plan.apply if o.get("kind") == "Namespace"}
        new_kinds = {_crd_kind(o) for o in plan.apply if o.get("kind") == "CustomResourceDefinition"}

        # 1. Dry run of the whole set before the first write.
        deferred: list[dict[str, Any]] = []
        rejected: list[str] = []
        for obj in plan.apply:
            ref = ObjectRef.of(obj)
            try:
                self._retry(f"dry-run {ref}", self._client.dry_run, obj)
            except ObjectNotFound as exc:
                if ref.namespace in new_namespaces:
                    deferred.append(obj)  # its namespace is created in step 2
                    continue
                statuses[ref] = _status(ref, "failed", f"dry run: {exc}")
                rejected.append(str(ref))
            except UnknownKind as exc:
                if (_group(ref.api_version), ref.kind) in new_kinds:
                    deferred.append(obj)  # its CRD is created in step 2
                    continue
                statuses[ref] = _status(ref, "failed", f"dry run: {exc}")
                rejected.append(str(ref))
            except ApplyFailed as exc:
                statuses[ref] = _status(ref, "failed", f"dry run: {exc}")
                rejected.append(str(ref))
        if rejected:
            return ApplyReport(rel, rev, "failed", f"dry run rejected, nothing applied: {', '.join(rejected)}", self._ordered(state, statuses))

        # 2. Namespaces and CRDs; CRDs waited until Established.
        deferred_refs = {ObjectRef.of(o) for o in deferred}
        foundations = [o for o in plan.apply if o.get("kind") in FOUNDATION_KINDS and ObjectRef.of(o) not in deferred_refs]
        failed = self._apply_all(foundations, statuses)
        if failed:
            return ApplyReport(rel, rev, "failed", f"rejected: {', '.join(failed)}", self._ordered(state, statuses))
        crds = [ObjectRef.of(o) for o in foundations if o.get("kind") == "CustomResourceDefinition"]
        not_ready = self._wait_ready(crds, statuses)
        if not_ready:
            return ApplyReport(rel, rev, "failed", f"CRD not established after {self._ready_timeout_s:.0f}s: {', '.join(not_ready)}",
                               self._ordered(state, statuses))
        for obj in deferred:
            ref = ObjectRef.of(obj)
            try:
                self._retry(f"dry-run {ref}", self._client.dry_run, obj)
            except ApplyFailed as exc:
                statuses[ref] = _status(ref, "failed", f"dry run: {exc}")
                rejected.append(str(ref))
        if rejected:
            return ApplyReport(rel, rev, "failed", f"dry run rejected, only namespaces and CRDs applied: {', '.join(rejected)}",
                               self._ordered(state, statuses))

        # 3. Everything else, the agent's own DaemonSet last.
        done = {ObjectRef.of(o) for o in foundations}
        rest = [o for o in plan.apply if ObjectRef.of(o) not in done]
        own = [o for o in rest if ObjectRef.of(o) == self._self_ref]
        failed = self._apply_all([o for o in rest if ObjectRef.of(o) != self._self_ref], statuses)
        if failed:
            # A rejection after a passed dry run (an admission webhook changed its mind): keep
            # what runs, no prune. The controller rolls back if it must.
            return ApplyReport(rel, rev, "failed", f"rejected: {', '.join(failed)}", self._ordered(state, statuses))

        # 4. Wait for the workloads; then replace our own pod (the record says "applying").
        workloads = [ObjectRef.of(o) for o in state.objects if o.get("kind") in WORKLOAD_KINDS and ObjectRef.of(o) != self._self_ref]
        not_ready = self._wait_ready(workloads, statuses)
        if not not_ready and self._self_ref is not None and any(ObjectRef.of(o) == self._self_ref for o in state.objects):
            if own:
                failed = self._apply_all(own, statuses)
                if failed:
                    return ApplyReport(rel, rev, "failed", f"rejected: {', '.join(failed)}", self._ordered(state, statuses))
            not_ready = self._wait_ready([self._self_ref], statuses)
        if not_ready:
            why = "failed" if any(statuses[ObjectRef.of(o)].status == "failed" for o in state.objects if ObjectRef.of(o) in statuses) else "not ready"
            return ApplyReport(rel, rev, "failed", f"{why} after {self._ready_timeout_s:.0f}s at most, nothing pruned: {', '.join(not_ready)}",
                               self._ordered(state, statuses))

        # 5. Prune, only now that the new set is ready.
        prune_failed: list[str] = []
        for ref in plan.prune:
            try:
                self._retry(f"prune {ref}", self._client.delete, ref)
                statuses[ref] = _status(ref, "pruned")
            except ApplyFailed as exc:
                statuses[ref] = _status(ref, "failed", f"prune: {exc}")
                prune_failed.append(str(ref))
        objects = self._ordered(state, statuses) + tuple(statuses[r] for r in plan.prune)
        if prune_failed:
            return ApplyReport(rel, rev, "failed", f"prune failed: {', '.join(prune_failed)}", objects)
        return ApplyReport(rel, rev, "applied", "", objects)

    def _apply_all(self, objs: Iterable[dict[str, Any]], statuses: dict[ObjectRef, ObjectStatus]) -> list[str]:
        failed: list[str] = []
        for obj in objs:
            ref = ObjectRef.of(obj)
            try:
                self._retry(f"apply {ref}", self._client.apply, obj)
                statuses[ref] = _status(ref, "applied")
            except ApplyFailed as exc:
                statuses[ref] = _status(ref, "failed", str(exc))
                failed.append(str(ref))
        return failed

    @staticmethod
    def _ordered(state: DesiredState, statuses: dict[ObjectRef, ObjectStatus]) -> tuple[ObjectStatus, ...]:
        return tuple(statuses[ObjectRef.of(o)] for o in state.objects if ObjectRef.of(o) in statuses)

    def _readiness(self, ref: ObjectRef) -> Readiness:
        live = self._retry(f"get {ref}", self._client.get, ref)
        return readiness(live) if live is not None else Readiness("pending", "not found")

    def _wait_ready(self, refs: list[ObjectRef], statuses: dict[ObjectRef, ObjectStatus]) -> list[str]:
        """Poll until every ref is ready, one has failed, or the ready timeout; return the refs not ready."""
        pending = list(refs)
        deadline = self._clock() + self._ready_timeout_s
        while True:
            still: list[ObjectRef] = []
            failed = False
            for ref in pending:
                r = self._readiness(ref)
                statuses[ref] = _status(ref, {"ready": "ready", "pending": "pending", "failed": "failed"}[r.state], r.why)
                if not r.ready:
                    still.append(ref)
                    failed = failed or r.state == "failed"
            pending = still
            if not pending or failed or self._clock() >= deadline:
                return [str(r) for r in pending]
            self._sleep(self._poll_interval_s)

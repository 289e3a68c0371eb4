"""Decide what to change in a cluster: a pure function of desired and live objects.

``diff(desired, live)`` returns an :class:`ApplyPlan`: objects to apply (in dependency order:
namespaces, then RBAC and config, then workloads), objects already up to date, and objects to
prune. An object is up to date when the live copy carries the same content hash (annotation
``shopfleet.io/applied-hash``) as the desired one, so an unchanged object is never re-sent, and a
prune only touches objects that carry our ``managed-by`` label and are not desired any more
(objects of older revisions), never a Namespace or a CustomResourceDefinition (deleting either
deletes everything inside it) and never a ref the caller protects (the agent's own DaemonSet).

:func:`readiness` reads a workload's status the way ``kubectl rollout status`` does, and a CRD's
``Established`` condition; :func:`contains` is the drift check (every field we set is still
what we set).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

HASH_ANNOTATION = "shopfleet.io/applied-hash"
MANAGED_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "shopfleet"
SHOP_LABEL = "shopfleet.io/shop"
REVISION_LABEL = "shopfleet.io/revision"

# Lower applies first; prune goes the other way round.
_KIND_ORDER = {
    "CustomResourceDefinition": 0,
    "Namespace": 0,
    "ServiceAccount": 1,
    "ClusterRole": 1,
    "ClusterRoleBinding": 2,
    "Role": 1,
    "RoleBinding": 2,
    "ConfigMap": 3,
    "Secret": 3,
    "Service": 4,
    "Deployment": 5,
    "DaemonSet": 5,
    "StatefulSet": 5,
}

NEVER_PRUNED_KINDS = frozenset({"Namespace", "CustomResourceDefinition"})
"""Kinds a prune never deletes: removing one removes everything in it, other releases' objects included."""

FOUNDATION_KINDS = frozenset({"Namespace", "CustomResourceDefinition"})
"""Kinds applied (and, for CRDs, waited for) before anything else: other objects need them to exist."""

WORKLOAD_KINDS = frozenset({"DaemonSet", "Deployment", "CustomResourceDefinition"})
"""Kinds whose status the handler waits on after applying."""


@dataclass(frozen=True, order=True)
class ObjectRef:
    """Identity of a Kubernetes object."""

    api_version: str
    kind: str
    namespace: str | None
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjectRef:
        """Return the identity of ``obj``."""
        meta = obj.get("metadata") or {}
        return cls(str(obj.get("apiVersion")), str(obj.get("kind")), meta.get("namespace"), str(meta.get("name")))

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace + '/' if self.namespace else ''}{self.name}"


@dataclass(frozen=True)
class ApplyPlan:
    """What to do: apply (with hash annotation set), leave alone, prune."""

    apply: tuple[dict[str, Any], ...]
    unchanged: tuple[ObjectRef, ...]
    prune: tuple[ObjectRef, ...]


def content_hash(obj: Mapping[str, Any]) -> str:
    """Return the SHA-256 of an object's canonical JSON, ignoring our own hash annotation."""
    o = copy.deepcopy(dict(obj))
    ann = (o.get("metadata") or {}).get("annotations") or {}
    ann.pop(HASH_ANNOTATION, None)
    return hashlib.sha256(json.dumps(o, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _order(ref: ObjectRef) -> tuple[int, ObjectRef]:
    return (_KIND_ORDER.get(ref.kind, 4), ref)


def desired_with_hash(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``obj`` carrying its content hash annotation, as the handler sends it."""
    out = copy.deepcopy(dict(obj))
    out.setdefault("metadata", {}).setdefault("annotations", {})[HASH_ANNOTATION] = content_hash(obj)
    return out


def diff(desired: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]], protect: Iterable[ObjectRef] = ()) -> ApplyPlan:
    """Return the plan that turns ``live`` (our managed objects) into ``desired`` (pure).

    ``protect`` names refs never pruned even when no longer desired (the agent's own DaemonSet:
    deleting it would stop the only process that can repair the shop).
    """
    protected = set(protect)
    live_by_ref = {ObjectRef.of(o): o for o in live}
    to_apply: list[tuple[ObjectRef, dict[str, Any]]] = []
    unchanged: list[ObjectRef] = []
    desired_refs = set()
    for d in desired:
        ref = ObjectRef.of(d)
        desired_refs.add(ref)
        h = content_hash(d)
        current = live_by_ref.get(ref)
        if current is not None and ((current.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION) == h:
            unchanged.append(ref)
            continue
        to_apply.append((ref, desired_with_hash(d)))
    prune = [
        ref
        for ref, o in live_by_ref.items()
        if ref not in desired_refs
        and ((o.get("metadata") or {}).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_BY
        and ref.kind not in NEVER_PRUNED_KINDS
        and ref not in protected
    ]
    to_apply.sort(key=lambda x: _order(x[0]))
    return ApplyPlan(
        apply=tuple(o for _, o in to_apply),
        unchanged=tuple(sorted(unchanged, key=_order)),
        prune=tuple(sorted(prune, key=_order, reverse=True)),
    )


@dataclass(frozen=True)
class Readiness:
    """Whether an applied object is ready: ``ready``, ``pending`` (wait more) or ``failed`` (stop waiting)."""

    state: Literal["ready", "pending", "failed"]
    why: str

    @property
    def ready(self) -> bool:
        """Return True when the object is ready."""
        return self.state == "ready"


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    conditions: list[Mapping[str, Any]] = status.get("conditions") or []
    for c in conditions:
        if c.get("type") == kind:
            return c
    return None


def readiness(obj: Mapping[str, Any]) -> Readiness:
    """Return the readiness of a live DaemonSet, Deployment or CRD; other kinds are ready when applied.

    As ``kubectl rollout status``: the controller must have observed the object's generation (else
    the counts describe the previous spec), every pod must run the new template (updated), no old
    pod may be left (a Deployment's ``replicas`` equals ``updatedReplicas``) and every pod must be
    available. A Deployment whose ``Progressing`` condition says ``ProgressDeadlineExceeded`` has
    failed: waiting longer will not help. A CRD is ready when ``Established`` is True.
    """
    kind = obj.get("kind")
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation", 0)
    if kind == "CustomResourceDefinition":
        est = _condition(status, "Established")
        if est is not None and est.get("status") == "True":
            return Readiness("ready", "established")
        return Readiness("pending", "not established yet" + (f": {est.get('message')}" if est and est.get("message") else ""))
    if kind not in ("DaemonSet", "Deployment"):
        return Readiness("ready", "applied")
    if status.get("observedGeneration", 0) < generation:
        return Readiness("pending", f"controller has not observed generation {generation} yet")
    if kind == "DaemonSet":
        want = status.get("desiredNumberScheduled", 0)
        updated = status.get("updatedNumberScheduled", 0)
        available = status.get("numberAvailable", 0)
        if updated < want:
            return Readiness("pending", f"{updated} of {want} pods updated")
        if available < want:
            return Readiness("pending", f"{available} of {want} updated pods available")
        return Readiness("ready", f"{available} of {want} pods updated and available")
    progressing = _condition(status, "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Readiness("failed", f"ProgressDeadlineExceeded: {progressing.get('message', 'the rollout made no progress')}")
    want = (obj.get("spec") or {}).get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < want:
        return Readiness("pending", f"{updated} of {want} replicas updated")
    if total > updated:
        return Readiness("pending", f"{total - updated} old replicas pending termination")
    if available < updated:
        return Readiness("pending", f"{available} of {updated} updated replicas available")
    return Readiness("ready", f"{available} of {want} replicas updated and available")


def contains(live: Any, want: Any) -> bool:
    """Return True when every field of ``want`` has the same value in ``live`` (the drift check).

    Fields the API server adds (defaults, status, managedFields) are ignored; a list must have the
    same length and each item must contain the wanted item. A false "drift" (a quantity the
    server normalised, ``1000m`` to ``1``) only costs a no-op apply, which the caller does not count.
    """
    if isinstance(want, Mapping):
        return isinstance(live, Mapping) and all(k in live and contains(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(contains(a, b) for a, b in zip(live, want, strict=True))
    return bool(live == want)

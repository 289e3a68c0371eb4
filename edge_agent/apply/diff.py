"""Decide what to change in a cluster: a pure function of desired and live objects.

``diff(desired, live)`` returns an :class:`ApplyPlan`: objects to apply (in dependency order:
namespaces, then RBAC and config, then workloads), objects already up to date, and objects to
prune. An object is up to date when the live copy carries the same content hash (annotation
``shopfleet.io/applied-hash``) as the desired one, so an unchanged object is never re-sent, and a
prune only touches objects that carry our ``managed-by`` label and are not desired any more
(objects of older revisions). :func:`workload_ready` reads a DaemonSet's or Deployment's status
the way ``kubectl rollout status`` does.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

HASH_ANNOTATION = "shopfleet.io/applied-hash"
MANAGED_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "shopfleet"
SHOP_LABEL = "shopfleet.io/shop"
REVISION_LABEL = "shopfleet.io/revision"

# Lower applies first; prune goes the other way round.
_KIND_ORDER = {
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


def diff(desired: Iterable[Mapping[str, Any]], live: Iterable[Mapping[str, Any]]) -> ApplyPlan:
    """Return the plan that turns ``live`` (our managed objects) into ``desired`` (pure)."""
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
        obj = copy.deepcopy(dict(d))
        obj.setdefault("metadata", {}).setdefault("annotations", {})[HASH_ANNOTATION] = h
        to_apply.append((ref, obj))
    prune = [
        ref
        for ref, o in live_by_ref.items()
        if ref not in desired_refs and ((o.get("metadata") or {}).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_BY
    ]
    to_apply.sort(key=lambda x: _order(x[0]))
    return ApplyPlan(
        apply=tuple(o for _, o in to_apply),
        unchanged=tuple(sorted(unchanged, key=_order)),
        prune=tuple(sorted(prune, key=_order, reverse=True)),
    )


def workload_ready(obj: Mapping[str, Any]) -> tuple[bool, str]:
    """Return (ready, why) for a DaemonSet or Deployment status; other kinds are ready when applied."""
    kind = obj.get("kind")
    status = obj.get("status") or {}
    generation = (obj.get("metadata") or {}).get("generation", 0)
    if kind not in ("DaemonSet", "Deployment"):
        return True, "applied"
    if status.get("observedGeneration", 0) < generation:
        return False, f"controller has not observed generation {generation} yet"
    if kind == "DaemonSet":
        want = status.get("desiredNumberScheduled", 0)
        updated = status.get("updatedNumberScheduled", 0)
        ready = status.get("numberReady", 0)
        if updated < want:
            return False, f"{updated} of {want} pods updated"
        if ready < want:
            return False, f"{ready} of {want} pods ready"
        return True, f"{ready} of {want} pods updated and ready"
    want = (obj.get("spec") or {}).get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < want:
        return False, f"{updated} of {want} replicas updated"
    if available < want:
        return False, f"{available} of {want} replicas available"
    return True, f"{available} of {want} replicas updated and available"

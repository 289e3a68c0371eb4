"""The small cluster interface the apply path needs, and an in-memory implementation of it.

``ClusterClient`` is a Protocol with five calls: list our managed objects, get one, server-side
apply one, validate one with a server-side dry run (nothing stored), delete one. :class:`~edge_agent.apply.kube.KubernetesClusterClient`
implements it with the ``kubernetes`` client; :class:`InMemoryClusterClient` keeps objects in a
dict and plays the DaemonSet/Deployment controllers (status follows spec at once, unless a test
holds a workload back), so the apply logic's decisions are tested fast; the HTTP path is tested
against the Kubernetes API emulator in ``tests/support/kube_emulator.py``.

Errors: ``ApplyFailed`` (and subclasses) when the API server refuses, ``ClusterUnavailable`` when
it does not answer usefully; the handler retries only the latter.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from edge_agent.apply.diff import MANAGED_BY, MANAGED_LABEL, SHOP_LABEL, ObjectRef
from edge_agent.apply.errors import ApplyFailed


class ClusterClient(Protocol):
    """What the apply handler needs from a Kubernetes cluster."""

    def list_managed(self, shop: str, desired: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Return every object labelled managed-by shopfleet for ``shop``.

        ``desired`` is the desired state's objects: a client that lists namespace by namespace
        (least privilege) takes the namespaces to look in from them.
        """
        ...

    def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        """Return the live object, or None if it does not exist."""
        ...

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` with field manager ``shopfleet``; raise ``ApplyFailed`` if rejected."""
        ...

    def dry_run(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply ``obj`` with ``dryRun=All``: validated and admitted, nothing stored."""
        ...

    def delete(self, ref: ObjectRef) -> None:
        """Delete the object (no error if it is already gone)."""
        ...


class InMemoryClusterClient:
    """A cluster in a dict: apply replaces, DaemonSets and Deployments become ready at once.

    ``reject`` returns an error text for an object the "API server" must refuse; ``hold`` names
    workloads whose pods never become ready. ``sent`` records every object applied, so a test can
    validate exactly what a real cluster would have received.
    """

    def __init__(self, nodes: int = 3, reject: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        self.objects: dict[ObjectRef, dict[str, Any]] = {}
        self.sent: list[dict[str, Any]] = []
        self.deleted: list[ObjectRef] = []
        self.hold: set[str] = set()
        self.nodes = nodes
        self._reject = reject
        self._lock = threading.Lock()

    def list_managed(self, shop: str, desired: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """Return managed objects of ``shop`` (all of them: a dict needs no permission per namespace)."""
        with self._lock:
            return [
                copy.deepcopy(o)
                for o in self.objects.values()
                if (o["metadata"].get("labels") or {}).get(MANAGED_LABEL) == MANAGED_BY
                and (o["metadata"].get("labels") or {}).get(SHOP_LABEL) == shop
            ]

    def get(self, ref: ObjectRef) -> dict[str, Any] | None:
        """Return a copy of the live object, with its status as the controllers would set it."""
        with self._lock:
            o = self.objects.get(ref)
            return copy.deepcopy(o) if o is not None else None

    def _check(self, obj: dict[str, Any]) -> None:
        if self._reject is not None:
            why = self._reject(obj)
            if why:
                raise ApplyFailed(f"{ObjectRef.of(obj)}: {why}", status=422)

    def dry_run(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Return ``obj`` as it would be stored, or raise ``ApplyFailed`` as ``apply`` would; store nothing."""
        self._check(obj)
        return copy.deepcopy(obj)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` (bumping generation) unless ``reject`` refuses it."""
        self._check(obj)
        ref = ObjectRef.of(obj)
        with self._lock:
            self.sent.append(copy.deepcopy(obj))
            old = self.objects.get(ref)
            new = copy.deepcopy(obj)
            meta = new.setdefault("metadata", {})
            meta["generation"] = (old or {}).get("metadata", {}).get("generation", 0) + 1
            new["status"] = self._status(new)
            self.objects[ref] = new
            return copy.deepcopy(new)

    def _status(self, obj: dict[str, Any]) -> dict[str, Any]:
        gen = obj["metadata"]["generation"]
        held = obj["metadata"]["name"] in self.hold
        if obj["kind"] == "DaemonSet":
            return {
                "observedGeneration": gen,
                "desiredNumberScheduled": self.nodes,
                "updatedNumberScheduled": 0 if held else self.nodes,
                "numberReady": 0 if held else self.nodes,
                "numberAvailable": 0 if held else self.nodes,
            }
        if obj["kind"] == "Deployment":
            n = (obj.get("spec") or {}).get("replicas", 1)
            return {"observedGeneration": gen, "replicas": n, "updatedReplicas": 0 if held else n, "availableReplicas": 0 if held else n}
        if obj["kind"] == "CustomResourceDefinition":
            return {"conditions": [{"type": "Established", "status": "True"}]}
        return {}

    def delete(self, ref: ObjectRef) -> None:
        """Remove the object if present."""
        with self._lock:
            if self.objects.pop(ref, None) is not None:
                self.deleted.append(ref)

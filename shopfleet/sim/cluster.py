"""A simulated shop cluster for the demo, the fleet-scale tests and the rollout benchmark.

:class:`SimulatedCluster` is an :class:`~edge_agent.apply.cluster.InMemoryClusterClient` that also
plays the shop's pipelines: once a release is applied it reports pipeline health and gate metrics
as a real shop's heartbeats would. Which releases misbehave is the simulator's own configuration
(``faults``), never something a release or the controller carries: the demo tells its simulated
GPU boxes "the vision image ``...@sha256:d4d4...`` is degraded", and every vision workload that
runs that image (or belongs to a release of that name) then behaves as follows:

* ``degraded``: vision pipelines run at a fraction of their fps, count errors, and the cart
  review rate climbs (the canary's health gates should fail);
* ``crash``: vision DaemonSets never become ready (the apply itself fails).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Literal, get_args

from edge_agent.apply.cluster import InMemoryClusterClient
from edge_agent.apply.diff import ObjectRef
from edge_agent.protocol import PipelineHealth

FaultMode = Literal["degraded", "crash"]
"""How a faulty release misbehaves in the simulation."""
FAULT_MODES: tuple[str, ...] = get_args(FaultMode)

RELEASE_LABEL = "shopfleet.io/release"
"""Label the controller's renderer stamps on every object of a release (its release name)."""

GOOD_FPS = 15.0
DEGRADED_FPS = 2.0
GOOD_REVIEW_RATE = 0.02
DEGRADED_REVIEW_RATE = 0.35


def _images(obj: Mapping[str, Any]) -> list[str]:
    pod = (((obj.get("spec") or {}).get("template") or {}).get("spec")) or {}
    return [str(c.get("image", "")) for c in (pod.get("containers") or []) + (pod.get("initContainers") or [])]


def _is_vision(obj: Mapping[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return obj.get("kind") == "DaemonSet" and labels.get("app.kubernetes.io/component") == "vision"


class SimulatedCluster(InMemoryClusterClient):
    """An in-memory cluster whose vision pipelines behave as the simulator's ``faults`` say.

    ``faults`` maps a release name or a container image reference to a :data:`FaultMode`; a
    vision workload of a listed release, or running a listed image, misbehaves so. Anything not
    listed runs well.
    """

    def __init__(self, nodes: int = 3, cameras: int = 4, seed: int | None = None, faults: Mapping[str, FaultMode] | None = None) -> None:
        super().__init__(nodes=nodes)
        bad = sorted(m for m in (faults or {}).values() if m not in FAULT_MODES)
        if bad:
            raise ValueError(f"unknown fault modes {bad}: use {', '.join(FAULT_MODES)}")
        self.cameras = cameras
        self.faults: dict[str, FaultMode] = dict(faults or {})
        self._rng = random.Random(seed)
        self._errors = 0
        self._last_release: str | None = None

    def fault_of(self, obj: Mapping[str, Any]) -> FaultMode | None:
        """Return the fault a workload is configured to have (None: it runs well)."""
        if not _is_vision(obj):
            return None
        release = ((obj.get("metadata") or {}).get("labels") or {}).get(RELEASE_LABEL)
        if release in self.faults:
            return self.faults[release]
        return next((self.faults[i] for i in _images(obj) if i in self.faults), None)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Apply ``obj``; a ``crash`` vision workload is held unready."""
        name = (obj.get("metadata") or {}).get("name", "")
        self._last_release = ((obj.get("metadata") or {}).get("labels") or {}).get(RELEASE_LABEL, self._last_release)
        if self.fault_of(obj) == "crash":
            self.hold.add(name)
        else:
            self.hold.discard(name)
        return super().apply(obj)

    def mode(self) -> str:
        """Return the worst fault among the live vision workloads ('ok' when none)."""
        modes = {self.fault_of(o) for o in self.objects.values()}
        for m in ("crash", "degraded"):
            if m in modes:
                return m
        return "ok"

    def health(self) -> tuple[dict[str, PipelineHealth], dict[str, float]]:
        """Return (pipelines, gate metrics) as this shop's heartbeat would report them now."""
        mode = self.mode()
        pipelines: dict[str, PipelineHealth] = {}
        if mode == "degraded":
            self._errors += self._rng.randint(3, 8)
        for i in range(self.cameras):
            if mode == "crash":
                pipelines[f"cam-{i}"] = PipelineHealth(kind="vision", state="backoff", fps=0.0, errors=self._errors, detail="pods not ready")
                continue
            base = DEGRADED_FPS if mode == "degraded" else GOOD_FPS
            fps = max(0.0, base + self._rng.uniform(-0.5, 0.5))
            pipelines[f"cam-{i}"] = PipelineHealth(kind="vision", state="running", fps=round(fps, 2), errors=self._errors)
        rate = DEGRADED_REVIEW_RATE if mode != "ok" else GOOD_REVIEW_RATE
        metrics = {"cart_review_rate": round(rate + self._rng.uniform(-0.01, 0.01), 4)}
        return pipelines, metrics

    def release(self) -> str | None:
        """Return the release label the live objects carry (None before the first apply)."""
        releases = {((o.get("metadata") or {}).get("labels") or {}).get(RELEASE_LABEL) for o in self.objects.values()} - {None}
        # Every object of an apply carries its release; mid-apply (or before a prune) there may be two.
        return max(releases) if len(releases) == 1 else (self._last_release if self._last_release in releases else None)

    def live_refs(self) -> list[ObjectRef]:
        """Return the refs of every live object."""
        return sorted(self.objects)

"""A simulated shop cluster for the demo and the fleet-scale tests.

:class:`SimulatedApplier` is an :class:`~edge_agent.apply.cluster.InMemoryClusterClient` that also
plays the shop's pipelines: once a release is applied it reports pipeline health and gate metrics
as a real shop's heartbeats would. A release can be made deliberately bad through the pod-template
annotation ``shopfleet.io/simulate`` (a release label ``simulate=...`` renders into it):

* ``degraded``: vision pipelines run at a fraction of their fps, count errors, and the cart
  review rate climbs (the canary's health gates should fail);
* ``crash``: vision DaemonSets never become ready (the apply itself fails).
"""

from __future__ import annotations

import random
from typing import Any

from edge_agent.apply.cluster import InMemoryClusterClient
from edge_agent.apply.diff import ObjectRef
from edge_agent.protocol import PipelineHealth

SIMULATE_ANNOTATION = "shopfleet.io/simulate"
SIMULATE_MODES = ("ok", "degraded", "crash")

GOOD_FPS = 15.0
DEGRADED_FPS = 2.0
GOOD_REVIEW_RATE = 0.02
DEGRADED_REVIEW_RATE = 0.35


def simulate_mode(obj: dict[str, Any]) -> str:
    """Return the simulate mode a workload's pod template asks for ('ok' if none)."""
    tmpl = ((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}
    mode = (tmpl.get("annotations") or {}).get(SIMULATE_ANNOTATION, "ok")
    return mode if mode in SIMULATE_MODES else "ok"


class SimulatedApplier(InMemoryClusterClient):
    """An in-memory cluster whose vision pipelines behave as the applied release says."""

    def __init__(self, nodes: int = 3, cameras: int = 4, seed: int | None = None) -> None:
        super().__init__(nodes=nodes)
        self.cameras = cameras
        self._rng = random.Random(seed)
        self._errors = 0

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Apply ``obj``; a ``crash`` vision workload is held unready."""
        name = (obj.get("metadata") or {}).get("name", "")
        if obj.get("kind") == "DaemonSet" and simulate_mode(obj) == "crash":
            self.hold.add(name)
        else:
            self.hold.discard(name)
        return super().apply(obj)

    def mode(self) -> str:
        """Return the worst simulate mode among the live vision workloads ('ok' when none)."""
        modes = {
            simulate_mode(o)
            for ref, o in self.objects.items()
            if ref.kind == "DaemonSet" and ((o.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component") == "vision"
        }
        for m in ("crash", "degraded"):
            if m in modes:
                return m
        return "ok"

    def health(self) -> tuple[dict[str, PipelineHealth], dict[str, float]]:
        """Return (pipelines, metrics) as this shop's heartbeat would report them now."""
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
        for ref, o in self.objects.items():
            if ref.kind == "Namespace":
                return ((o.get("metadata") or {}).get("labels") or {}).get("shopfleet.io/release")
        return None

    def live_refs(self) -> list[ObjectRef]:
        """Return the refs of every live object."""
        return sorted(self.objects)

"""The apply tests' shared rig: signed desired states of a test shop and a handler on an in-memory cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from edge_agent.apply.cluster import InMemoryClusterClient
from edge_agent.apply.handler import ApplyMetrics, ApplyReport, DesiredStateHandler
from edge_agent.apply.verify import RevisionStore, Verifier
from edge_agent.protocol import DesiredState
from fleet_controller.rollout.releases import ReleaseSpec, desired_state_for
from fleet_controller.rollout.signing import Signer

SHOP = "berlin-01"
DIGEST = "@sha256:" + "12" * 32


def _release(name: str = "r1", **labels: str) -> ReleaseSpec:
    return ReleaseSpec(name=name, version="1", images={"vision": f"reg.example/vision{DIGEST}"}, labels=labels)


def _state(signer: Signer, revision: int, release: str = "r1", classes=frozenset({"pi", "gpu"}), shop: str = SHOP, **labels: str) -> DesiredState:
    return desired_state_for(shop, _release(release, **labels), revision, signer, node_classes=classes)


class Rig:
    def __init__(self, tmp_path: Path, verifier: Verifier, client: Any = None, **kw: Any) -> None:
        self.reports: list[ApplyReport] = []
        self.registry = CollectorRegistry()
        self.client = client or InMemoryClusterClient()
        self.store = RevisionStore(tmp_path / "state" / "applied.json")
        self.handler = DesiredStateHandler(SHOP, verifier, self.store, self.client, self.reports.append, metrics=ApplyMetrics(self.registry), **kw)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def _forge(state: DesiredState) -> DesiredState:
    objs = [dict(o) for o in state.objects]
    objs[0] = {**objs[0], "metadata": {**objs[0]["metadata"], "name": "evil"}}
    return state.model_copy(update={"objects": tuple(objs)})

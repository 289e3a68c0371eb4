"""shopfleet.sim: the simulated cluster misbehaves only on what its own faults name; demo users; the camera's gate metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge_agent.apply.handler import ApplyMetrics, ApplyReport, DesiredStateHandler
from edge_agent.apply.verify import RevisionStore, Verifier
from edge_agent.protocol import Reading
from fleet_controller.rollout.releases import ReleaseSpec, desired_state_for
from fleet_controller.rollout.signing import Signer, generate_keypair
from shopfleet.sim.camera import SimulatedCamera
from shopfleet.sim.cluster import DEGRADED_FPS, SimulatedCluster
from tests.support.wait import wait_for

SHOP = "lab-01"
GOOD_IMAGE = "reg.example/vision@sha256:" + "12" * 32
BAD_IMAGE = "reg.example/vision@sha256:" + "d4" * 32


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    generate_keypair(tmp_path / "k.pem")
    return Signer.from_file(tmp_path / "k.pem")


def _apply(tmp_path: Path, signer: Signer, cluster: SimulatedCluster, release: str, image: str) -> ApplyReport:
    handler = DesiredStateHandler(
        SHOP, Verifier.from_files([tmp_path / "k.pub"]), RevisionStore(tmp_path / "applied.json"), cluster, lambda r: None,
        metrics=ApplyMetrics(CollectorRegistry()), ready_timeout_s=0, poll_interval_s=0,
    )
    spec = ReleaseSpec(name=release, version="1", images={"vision": image})
    return handler.handle(desired_state_for(SHOP, spec, 1, signer, node_classes=frozenset({"pi", "gpu"})))


@pytest.mark.parametrize(
    "faults, release, image, status, fps_low",
    [
        pytest.param({}, "r-x", GOOD_IMAGE, "applied", False, id="no-faults-runs-well"),
        pytest.param({BAD_IMAGE: "degraded"}, "r-x", GOOD_IMAGE, "applied", False, id="other-image-runs-well"),
        pytest.param({BAD_IMAGE: "degraded"}, "r-x", BAD_IMAGE, "applied", True, id="bad-image-runs-slow"),
        pytest.param({"r-x": "degraded"}, "r-x", GOOD_IMAGE, "applied", True, id="bad-release-name-runs-slow"),
        pytest.param({"r-x": "crash"}, "r-x", GOOD_IMAGE, "failed", None, id="crash-release-never-ready"),
    ],
)
def test_simulated_cluster_misbehaves_only_on_its_configured_faults(tmp_path, signer, faults, release, image, status, fps_low):
    cluster = SimulatedCluster(seed=1, faults=faults)
    report = _apply(tmp_path, signer, cluster, release, image)
    assert report.status == status
    pipelines, metrics = cluster.health()
    if fps_low is None:
        assert {p.state for p in pipelines.values()} == {"backoff"}
    else:
        fps = [p.fps for p in pipelines.values()]
        assert (max(fps) <= DEGRADED_FPS + 0.5) is fps_low
        assert (metrics["cart_review_rate"] > 0.1) is fps_low
    assert cluster.release() == release


def test_simulated_cluster_refuses_an_unknown_fault_mode():
    with pytest.raises(ValueError, match="unknown fault modes \\['slow'\\]: use degraded, crash"):
        SimulatedCluster(faults={"r1": "slow"})  # type: ignore[dict-item]


class Sink:
    def __init__(self) -> None:
        self.gates: dict[str, tuple[float, str]] = {}
        self.readings_seen: list[Reading] = []

    def event(self, type: str, source: str, data: dict[str, Any], at: float | None = None) -> None:
        pass

    def alert(self, name: str, state: str, severity: str, source: str, message: str = "", data: dict[str, Any] | None = None) -> None:
        pass

    def readings(self, readings: list[Reading]) -> None:
        self.readings_seen.extend(readings)

    def gate_metric(self, name: str, value: float, worse: str = "higher") -> None:
        self.gates[name] = (value, worse)


def test_simulated_camera_reports_gate_metrics_through_the_sink(tmp_path, signer):
    cluster = SimulatedCluster(seed=3, faults={BAD_IMAGE: "degraded"})
    _apply(tmp_path, signer, cluster, "r-bad", BAD_IMAGE)
    cam, sink, stop = SimulatedCamera("door-cam", cluster, seed=3), Sink(), threading.Event()
    t = threading.Thread(target=cam.run, args=(stop, sink), daemon=True)
    t.start()
    try:
        wait_for(lambda: "vision_fps" in sink.gates and "cart_review_rate" in sink.gates, 10, "the camera's gate metrics")
    finally:
        stop.set()
        t.join(5)
    assert sink.gates["vision_fps"][0] <= DEGRADED_FPS + 0.5 and sink.gates["vision_fps"][1] == "lower"
    assert sink.gates["cart_review_rate"][0] > 0.1 and sink.gates["cart_review_rate"][1] == "higher"
    assert any(r.name == "occupancy" for r in sink.readings_seen)


def test_demo_users_get_fresh_passwords_that_log_in(tmp_path):
    from argon2 import PasswordHasher

    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.migrations import upgrade
    from fleet_controller.web.accounts.store import AccountStore
    from shopfleet.sim.users import DEMO_ROLES, create_demo_users

    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(engine)
    first = create_demo_users(engine)
    again = create_demo_users(engine)  # a demo restarted on the same data dir resets them
    assert set(first) == set(again) == set(DEMO_ROLES)
    assert all(first[u] != again[u] and len(again[u]) >= 10 for u in first)
    store = AccountStore(engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    assert all(store.verify_password(u, p) for u, p in again.items())
    assert not store.verify_password("operator", first["operator"])
    assert {u.username: u.role.value for u in store.list_users()} == DEMO_ROLES

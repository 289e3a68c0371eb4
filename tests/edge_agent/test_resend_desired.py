"""Re-send the desired state (a remote action) to a real applying agent over a real Mosquitto.

The controller re-renders and re-signs the shop's current revision and publishes it retained; the
agent verifies it and applies it idempotently: the first time it is applied, a re-send of the
same revision is reported applied again without touching the cluster, and the controller's action
settles on that report.
"""

from __future__ import annotations

import time
from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.apply.plugin import attach
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.protocol import ReportedState, Topics, parse_message
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.read import RegistryReader
from fleet_controller.registry.store import RegistryStore
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
from fleet_controller.rollout.signing import generate_keypair
from fleet_controller.rollout.store import DESIRED
from fleet_controller.web.remote_actions import RemoteActions
from shopfleet.broker import BrokerProcess
from shopfleet.sim.cluster import SimulatedCluster
from tests.support.recorder import Recorder, publish, wait_for

SHOP, NODE = "lab-01", "server-1"


class BrokerPublisher:
    def __init__(self, port: int) -> None:
        self.port = port

    def publish_sync(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        publish(self.port, topic, payload, retain=retain)


def test_resend_is_applied_once_and_then_idempotently(broker: BrokerProcess, tmp_path: Path):
    generate_keypair(tmp_path / "ctl.key")
    engine = create_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    upgrade(engine)
    store = RegistryStore(engine)
    store.register_shop(SHOP, applier=NODE)
    ReleaseStore(engine).create(ReleaseSpec(name="r7", version="7", images={"vision": "reg.example/vision@sha256:" + "0a" * 32}))
    with engine.begin() as conn:
        conn.execute(DESIRED.insert().values(shop_id=SHOP, revision=3, release="r7", rollout_id=None, published_at=time.time()))
    actions = RemoteActions(engine, RegistryReader(engine), tmp_path / "ctl.key", lambda: BrokerPublisher(broker.port))

    config = validate_config({
        "shop": SHOP, "node": NODE, "heartbeat_interval_s": 30,
        "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
        "apply": {"enabled": True, "public_keys": [str(tmp_path / "ctl.pub")], "state_path": str(tmp_path / "applied.json"),
                  "ready_timeout_s": 2, "poll_interval_s": 0.05, "drift_interval_s": 0},
    })
    agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))
    sim = SimulatedCluster()
    assert attach(agent, config.apply, client=sim) is not None
    rec = Recorder(broker.port, (Topics.reported(SHOP, NODE),))
    agent.start()
    try:
        assert agent.wait_connected(10)

        def reports() -> list[ReportedState]:
            with rec._lock:
                return [m for t, p, _ in rec.messages if isinstance(m := parse_message(t, p), ReportedState)]

        actions.resend_desired(SHOP)
        first = wait_for(lambda: [r for r in reports() if r.status == "applied"], 20, "the first apply")
        assert first[-1].revision == 3 and first[-1].error == "" and sim.live_refs()
        versions = {str(ref): (sim.get(ref) or {}).get("metadata", {}).get("resourceVersion") for ref in sim.live_refs()}
        applied_first = agent.registry.get_sample_value("shopfleet_agent_apply_total", {"outcome": "applied"})

        second = actions.resend_desired(SHOP)
        again = wait_for(lambda: [r for r in reports() if r.status == "applied" and r.error == "already applied"], 20, "the re-send")
        assert again[-1].revision == 3
        assert agent.registry.get_sample_value("shopfleet_agent_apply_total", {"outcome": "unchanged"}) == 1
        assert agent.registry.get_sample_value("shopfleet_agent_apply_total", {"outcome": "applied"}) == applied_first
        assert {str(ref): (sim.get(ref) or {}).get("metadata", {}).get("resourceVersion") for ref in sim.live_refs()} == versions

        # the controller's action settles on the applier's report (stored as the intake would)
        from tests.support.controller import batch, presence

        now = time.time() + 1
        store.write_batch(batch(presence(shop=SHOP, node=NODE), again[-1], at=now), now)
        (settled,) = [a for a in actions.settle(SHOP) if a.id == second.id]
        assert settled.status == "ok" and "applied" in settled.message
    finally:
        agent.stop(timeout=2)
        rec.close()
        engine.dispose()

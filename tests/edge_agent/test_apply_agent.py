"""The apply path inside the real agent over a real Mosquitto: signed state in, retained report out."""

from __future__ import annotations

from pathlib import Path

from edge_agent.agent import Agent
from edge_agent.apply.plugin import attach
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.protocol import Topics, encode, parse_message
from fleet_controller.rollout.releases import ReleaseSpec, desired_state_for
from fleet_controller.rollout.signing import Signer, generate_keypair
from shopfleet.broker import BrokerProcess
from shopfleet.sim.cluster import SimulatedCluster
from tests.support.recorder import Recorder, publish, wait_for

SHOP, NODE = "lab-01", "server-1"


def test_agent_applies_signed_state_and_refuses_a_replay(broker: BrokerProcess, tmp_path: Path):
    generate_keypair(tmp_path / "ctl.pem")
    signer = Signer.from_file(tmp_path / "ctl.pem")
    config = validate_config({
        "shop": SHOP, "node": NODE, "heartbeat_interval_s": 30,
        "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
        "apply": {"enabled": True, "public_keys": [str(tmp_path / "ctl.pub")], "state_path": str(tmp_path / "applied.json"),
                  "ready_timeout_s": 1, "poll_interval_s": 0.05},
    })
    agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))
    sim = SimulatedCluster()
    handler = attach(agent, config.apply, client=sim)
    assert handler is not None
    rec = Recorder(broker.port, (Topics.reported(SHOP, NODE),))
    agent.start()
    try:
        assert agent.wait_connected(10)
        spec = ReleaseSpec(name="r7", version="7", images={"vision": "reg.example/vision@sha256:" + "0a" * 32})

        def reports():
            with rec._lock:
                return [parse_message(t, p) for t, p, _ in rec.messages]

        publish(broker.port, Topics.desired(SHOP), encode(desired_state_for(SHOP, spec, 3, signer)), retain=True)
        done = wait_for(lambda: [r for r in reports() if r.status == "applied"], 15, "the applied report")
        assert done[-1].revision == 3 and done[-1].release == "r7" and {o.status for o in done[-1].objects} <= {"applied", "ready"}
        assert sim.release() == "r7" and agent.release == "r7"
        assert [r.status for r in reports()][:2] == ["applying", "applied"]
        publish(broker.port, Topics.desired(SHOP), encode(desired_state_for(SHOP, spec, 2, signer)), retain=True)
        refused = wait_for(lambda: [r for r in reports() if r.status == "refused"], 15, "the replay refusal")
        assert refused[-1].revision == 2 and refused[-1].error.startswith("replay")
        assert agent.registry.get_sample_value("shopfleet_agent_apply_refused_total", {"reason": "replay"}) == 1
    finally:
        agent.stop(timeout=2)
        rec.close()

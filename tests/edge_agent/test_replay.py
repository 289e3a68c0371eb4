"""Replay and downgrade are refused even when the agent's local state file is lost (issue 10 item 5)."""

from __future__ import annotations

import json
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
from tests.support.apply import Rig, _forge, _state
from tests.support.recorder import Recorder, publish, wait_for

SHOP, NODE = "lab-01", "server-1"


def test_state_file_deleted_then_replay_is_refused(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    assert rig.handler.handle(_state(signer, 2, "r2")).status == "applied"
    rig.store.path.unlink()  # an attacker (or a disk problem) removes applied.json
    report = rig.handler.handle(_state(signer, 1, "r1"))
    assert report.status == "refused" and report.error.startswith("replay")
    assert {o["metadata"]["labels"]["shopfleet.io/release"] for o in rig.client.objects.values()} == {"r2"}


def test_a_new_process_without_the_state_file_learns_from_the_seen_file(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    rig.handler.handle(_state(signer, 2, "r2"))
    rig.store.path.unlink()
    assert json.loads(rig.store.seen_path.read_text()) == {"highest_seen": 2}
    rig2 = Rig(tmp_path, verifier, client=rig.client)
    assert rig2.handler.handle(_state(signer, 1, "r1")).error.startswith("replay")


def test_with_no_files_at_all_the_retained_state_teaches_the_newest_revision(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    retained, replay = _state(signer, 2, "r2"), _state(signer, 1, "r1")
    assert rig.handler.observe(retained)  # what the broker delivers first on connection
    assert not rig.handler.observe(replay)
    assert rig.reports[-1].status == "refused" and rig.reports[-1].revision == 1
    assert rig.metric("shopfleet_agent_apply_refused_total", reason="replay") == 1
    assert rig.handler.handle(replay).error.startswith("replay")  # and if it reaches the handler anyway
    assert rig.client.sent == []


def test_a_forged_high_revision_does_not_raise_the_mark(tmp_path, keys):
    signer, verifier = keys
    rig = Rig(tmp_path, verifier)
    forged = _forge(_state(signer, 99))
    assert not rig.handler.observe(forged)  # refused, and it displaces nothing
    assert rig.handler.high_water.value == 0
    assert rig.metric("shopfleet_agent_apply_refused_total", reason="forged") == 1
    assert rig.handler.handle(_state(signer, 3)).status == "applied"


def test_real_agent_without_state_refuses_a_captured_older_revision(broker: BrokerProcess, tmp_path: Path):
    """Revision 2 is retained; the agent loses applied.json and its .seen file and restarts; a captured revision 1 is replayed."""
    generate_keypair(tmp_path / "ctl.pem")
    signer = Signer.from_file(tmp_path / "ctl.pem")
    state_path = tmp_path / "applied.json"
    config = validate_config({
        "shop": SHOP, "node": NODE, "heartbeat_interval_s": 30,
        "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
        "apply": {"enabled": True, "public_keys": [str(tmp_path / "ctl.pub")], "state_path": str(state_path),
                  "ready_timeout_s": 1, "poll_interval_s": 0.05, "drift_interval_s": 0},
    })
    spec1 = ReleaseSpec(name="r1", version="1", images={"vision": "reg.example/vision@sha256:" + "0a" * 32})
    spec2 = ReleaseSpec(name="r2", version="2", images={"vision": "reg.example/vision@sha256:" + "0b" * 32})
    captured = encode(desired_state_for(SHOP, spec1, 1, signer))  # what an attacker recorded earlier
    publish(broker.port, Topics.desired(SHOP), encode(desired_state_for(SHOP, spec2, 2, signer)), retain=True)
    sim = SimulatedCluster()
    rec = Recorder(broker.port, (Topics.reported(SHOP, NODE),))

    def reports():
        with rec._lock:
            return [parse_message(t, p) for t, p, _ in rec.messages]

    def run_agent() -> Agent:
        agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))
        assert attach(agent, config.apply, client=sim) is not None
        agent.start()
        assert agent.wait_connected(10)
        return agent

    agent = run_agent()
    try:
        wait_for(lambda: [r for r in reports() if r.status == "applied" and r.revision == 2], 15, "revision 2 applied")
    finally:
        agent.stop(timeout=2)
    state_path.unlink()
    state_path.with_name(state_path.name + ".seen").unlink()
    state_path.with_name(state_path.name + ".desired.json").unlink()
    agent = run_agent()
    try:
        # The retained revision 2 arrives on connection and is what the agent learns from.
        wait_for(lambda: len([r for r in reports() if r.status == "applied" and r.revision == 2]) >= 2, 15, "revision 2 again")
        publish(broker.port, Topics.desired(SHOP), captured)  # the replay
        refused = wait_for(lambda: [r for r in reports() if r.status == "refused"], 15, "the replay refusal")
        assert refused[-1].revision == 1 and refused[-1].error.startswith("replay")
        assert sim.release() == "r2" and agent.release == "r2"
        assert not any(r.status in ("applying", "applied") and r.revision == 1 for r in reports())
    finally:
        agent.stop(timeout=2)
        rec.close()

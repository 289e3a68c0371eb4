"""End-to-end acknowledgement (issue 15): with ``uplink.ack: controller`` a broker that drops queued messages loses nothing.

A real Mosquitto with ``max_queued_messages 5``, a real controller (its writer process, SQLite)
and a real agent. While the controller is away the broker keeps 5 of its messages and drops the
rest ("Outgoing messages are being dropped"); with broker acks they were gone, now the agent still
holds them until the controller's stored-ack covers them, and re-sends them.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.protocol import Event
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.store import EVENTS, NODES
from shopfleet.broker import BrokerProcess
from tests.support.controller import RunningController, controller_settings
from tests.support.wait import wait_for

SHOP, NODE = "shop-e2e", "pi-1"


def _agent(broker: BrokerProcess, tmp_path: Path, ack: str) -> Agent:
    config = validate_config({
        "shop": SHOP, "node": NODE, "heartbeat_interval_s": 3600,
        "broker": {"port": broker.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
        "uplink": {"ack": ack, "ack_timeout_s": 1.0},
        "shutdown_timeout_s": 2,
    })
    return Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))


def _stored_event_seqs(engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(int(s) for s in conn.scalars(select(EVENTS.c.seq).where(EVENTS.c.kind == "event", EVENTS.c.shop_id == SHOP)))


def test_controller_acks_lose_nothing_under_a_broker_that_drops_queued_messages(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = BrokerProcess(workdir=tmp_path / "broker", extra_config="max_queued_messages 5")
    broker.start()
    settings = controller_settings(broker, tmp_path, broker={"client_id": "e2e-controller"})
    controller = RunningController(settings)
    agent = _agent(broker, tmp_path, "controller")
    engine = create_engine(settings.database_url())
    try:
        agent.start()
        assert agent.wait_connected(10)
        seqs = [agent.send(Event, type="door_opened", source="door-1", data={"n": i}) for i in range(5)]
        wait_for(lambda: _stored_event_seqs(engine) == seqs, timeout=20, what="the first events stored")
        wait_for(lambda: agent.outbox.depth() == 0, timeout=10, what="the stored-ack to empty the outbox")

        controller.stop()  # away: the broker queues 5 messages for its session and drops the rest
        seqs += [agent.send(Event, type="door_opened", source="door-1", data={"n": i}) for i in range(5, 45)]
        wait_for(lambda: agent.uplink._inflight == {} and agent.uplink._awaiting_since is not None, timeout=10,
                 what="the broker to acknowledge every publish")
        assert agent.outbox.depth() >= 40  # a PUBACK no longer deletes: the controller has not stored them

        controller = RunningController(settings)
        wait_for(lambda: _stored_event_seqs(engine) == seqs, timeout=60, what="every event stored after the controller came back")
        wait_for(lambda: agent.outbox.depth() == 0, timeout=20, what="the outbox to drain on stored-acks")
        assert agent.uplink.resends >= 1  # what the broker dropped came again from the agent
        with engine.connect() as conn:
            node = conn.execute(select(NODES).where(NODES.c.shop_id == SHOP, NODES.c.node_id == NODE)).one()
        assert (node.gaps, node.missing_total) == ([], 0)
    finally:
        agent.stop(timeout=2)
        controller.stop()
        engine.dispose()
        broker.cleanup()


def test_heartbeat_carries_the_outbox_evicted_runs(tmp_path: Path) -> None:
    import json

    from edge_agent.protocol import Reading, Telemetry, parse_message

    config = validate_config({"shop": SHOP, "node": NODE, "broker": {"port": 1}, "outbox": {"path": str(tmp_path / "o.db"), "max_messages": 10}})
    agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))  # never started: an outage
    try:
        for _ in range(14):
            agent.send(Telemetry, readings=[Reading(name="temperature_c", value=4.0, source="fridge-1")])
        seq = agent.heartbeat()
        row = next(m for m in agent.outbox.peek(limit=100) if m.seq == seq)
        hb = parse_message(row.topic, row.payload)
        assert [(r.first, r.last, r.priority) for r in hb.evicted] == [(1, 4, "telemetry")]
        assert json.loads(row.payload)["evicted"] == [{"first": 1, "last": 4, "priority": "telemetry"}]
        # Acknowledging the heartbeat forgets the runs it carried; the next heartbeat reports only
        # what was evicted since (seq 5, evicted to make room for the first heartbeat itself).
        agent.outbox.ack([seq])
        seq2 = agent.heartbeat()
        nxt = next(m for m in agent.outbox.peek(limit=100) if m.seq == seq2)
        assert [(r.first, r.last) for r in parse_message(nxt.topic, nxt.payload).evicted] == [(5, 5)]
    finally:
        agent.outbox.close()

"""End-to-end acknowledgement (issue 15): with ``uplink.ack: controller`` a broker that drops queued messages loses nothing.

A real Mosquitto with ``max_queued_messages 5``, a real controller (its writer process, SQLite)
and a real agent. While the controller is away the broker keeps 5 of its messages and drops the
rest ("Outgoing messages are being dropped"); with broker acks they were gone, now the agent still
holds them until the controller's stored-ack covers them, and re-sends them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.outbox import Outbox
from edge_agent.protocol import Channel, Event, Reading, StoredAck, Telemetry, Topics, encode
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.store import EVENTS, NODES
from shopfleet.broker import BrokerProcess
from tests.support.chaos_proxy import ChaosProxy
from tests.support.controller import RunningController, controller_settings
from tests.support.recorder import Recorder
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
    settings = controller_settings(broker, tmp_path, broker={"client_id": "e2e-controller"}, intake={"ack_nodes": True})
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
        wait_for(lambda: agent.uplink._inflight == {} and agent.uplink._awaiting, timeout=10,
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


class HoleyAcker:
    """A controller stand-in on real Mosquitto: stores what arrives and publishes a cumulative stored-ack
    after every message, but ignores the first delivery of the ``skip`` seqs, so its acks keep naming
    them as ``missing`` while newer seqs are confirmed (what a killed controller replica leaves behind)."""

    def __init__(self, port: int, skip: set[int]) -> None:
        self.skip = set(skip)
        self.stored: set[int] = set()
        self.arrivals: dict[int, list[float]] = {}
        self.acks = 0
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"holey-acker-{uuid.uuid4().hex[:8]}")
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        wait_for(self.connected.is_set, 10, "the acker to connect")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(Topics.node(SHOP, NODE, Channel.EVENTS), 1), (Topics.node(SHOP, NODE, Channel.TELEMETRY), 1)])
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        m = json.loads(msg.payload)
        seq = int(m["seq"])
        with self._lock:
            self.arrivals.setdefault(seq, []).append(time.monotonic())
            if seq in self.skip and len(self.arrivals[seq]) == 1:
                return  # lost with the replica that held it
            self.stored.add(seq)
            top = max(self.stored)
            holes = [s for s in range(1, top) if s not in self.stored]
            self.acks += 1
        missing = tuple((s, s) for s in holes)
        client.publish(Topics.node(SHOP, NODE, Channel.ACK),
                       encode(StoredAck(shop=SHOP, node=NODE, epoch=m["epoch"], seq=top, missing=missing)), qos=1)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_holes_the_stored_acks_name_are_resent_while_newer_messages_are_confirmed(tmp_path: Path) -> None:
    """Per-message timeout: a hole goes again ~ack_timeout_s after its send even though every new message is
    confirmed at once (before, progress reset the one timer and the holes waited for the stream to pause)."""
    (tmp_path / "broker").mkdir()
    broker = BrokerProcess(workdir=tmp_path / "broker")
    broker.start()
    skip = {4, 9}
    acker = HoleyAcker(broker.port, skip)
    agent = _agent(broker, tmp_path, "controller")  # ack_timeout_s 1.0
    sent: list[int] = []
    try:
        agent.start()
        assert agent.wait_connected(10)
        deadline = time.monotonic() + 30
        # The stream never pauses: an event every 50 ms until each skipped seq came a second time.
        while not all(len(acker.arrivals.get(s, [])) >= 2 for s in skip):
            assert time.monotonic() < deadline, f"holes {sorted(skip)} not re-sent while the stream went on: their arrivals {({s: acker.arrivals.get(s) for s in skip})}"
            sent.append(agent.send(Event, type="door_opened", source="door-1", data={"n": len(sent)}))
            time.sleep(0.05)  # the stream's pace, not an assertion
        acks_while_open = acker.acks
        for s in skip:
            first, again = acker.arrivals[s][:2]
            # timed from the PUBACK, which may precede the first arrival by a few ms
            assert 0.9 <= again - first < 1.0 + 5.0, f"seq {s} re-sent {again - first:.2f}s after its first send (ack_timeout_s 1.0)"
        assert acks_while_open > 10, "newer messages were confirmed while the holes were open"
        wait_for(lambda: agent.outbox.depth() == 0, timeout=15, what="the re-sent holes to be confirmed and the outbox to drain")
        assert skip <= acker.stored and set(sent) <= acker.stored
        resent = agent.registry.get_sample_value("shopfleet_agent_messages_resent_total")
        assert resent is not None and resent >= len(skip) and agent.uplink.resends == resent
        # Bounded: the confirmed messages were not sent again wholesale.
        doubled = [s for s, times in acker.arrivals.items() if s not in skip and len(times) > 1]
        assert len(doubled) <= len(sent) // 4, f"{len(doubled)} confirmed messages re-sent: {doubled}"
    finally:
        agent.stop(timeout=2)
        acker.close()
        broker.cleanup()


def test_a_stop_right_after_an_outage_sends_the_pending_eviction_reports(tmp_path: Path) -> None:
    """Evicted runs ride in heartbeats; an agent stopped (SIGTERM path: Agent.stop) after an outage, before a heartbeat
    carried them, sends one last heartbeat once its outbox drained, so the controller never counts them as missing."""
    (tmp_path / "broker").mkdir()
    broker = BrokerProcess(workdir=tmp_path / "broker")
    broker.start()
    recorder = Recorder(broker.port, (Topics.node(SHOP, NODE, Channel.TELEMETRY),))
    proxy = ChaosProxy(broker.port).start()
    proxy.cut("reset")  # the outage: no connection gets through
    path = tmp_path / "outbox.db"
    config = validate_config({
        "shop": SHOP, "node": NODE, "heartbeat_interval_s": 3600,
        "broker": {"port": proxy.port, "reconnect_min_s": 0.05, "reconnect_max_s": 0.3},
        "outbox": {"path": str(path), "synchronous": "normal", "max_messages": 10},
        "shutdown_timeout_s": 20,
    })
    agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))
    try:
        agent.start()
        wait_for(lambda: agent.heartbeats_sent == 1, 10, "the first heartbeat (enqueued before any eviction)")
        for i in range(25):
            agent.send(Telemetry, readings=[Reading(name="temperature_c", value=float(i), source="fridge-1")])
        evicted = {s for r in agent.outbox.evicted_ranges() for s in range(r.first, r.last + 1)}
        assert len(evicted) >= 15 and agent.outbox.unreported_evictions() > 0
        stopping = threading.Thread(target=agent.stop)
        stopping.start()
        proxy.restore()
        stopping.join(40)
        assert not stopping.is_alive()
        beats = [m for m in recorder.payloads("/telemetry") if m["kind"] == "heartbeat"]
        reported = {s for m in beats for r in m.get("evicted", []) for s in range(r["first"], r["last"] + 1)}
        assert reported == evicted, f"heartbeats reported {sorted(reported)}, the outbox evicted {sorted(evicted)}"
        assert len(beats) == 2  # the first one and the final one
        box = Outbox(path)
        try:
            assert box.depth() == 0 and box.evicted_ranges() == []  # reported and acknowledged: nothing left for the next start
        finally:
            box.close()
    finally:
        proxy.close()
        recorder.close()
        broker.cleanup()

"""The agent's uplink on a real generated broker: a publish the ACL refuses is counted, dropped, never called sent."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.metrics import AgentMetrics
from edge_agent.mqtt import MqttSettings
from edge_agent.outbox import Outbox, Priority
from edge_agent.protocol import Event, Topics
from edge_agent.uplink import UplinkLoop
from tests.support.security import Client, tls_of
from tests.support.wait import wait_for

OWN = Topics.node("shop-a", "pi-1", "telemetry")
FOREIGN = Topics.node("shop-b", "pi-1", "telemetry")


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("ack", ["broker", "controller"])
def test_mqtt5_agent_counts_and_drops_a_refused_publish(deploy, tmp_path, ack):
    dep = deploy()
    dep.central()
    creds = dep.creds
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/shop-a/pi-1/telemetry")
    ctl.subscribe("fleet/v1/shop-b/#")
    node = creds["nodes"]["shop-a/pi-1"]
    settings = MqttSettings(host="127.0.0.1", port=dep.options.port, client_id="agent-shop-a-pi-1",
                            username=node["username"], password=node["password"], protocol="5")
    outbox = Outbox(tmp_path / "outbox.db", synchronous="normal")
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    for topic, body in ((OWN, b"ok-1"), (FOREIGN, b"forged"), (OWN, b"ok-2")):
        outbox.enqueue("telemetry", Priority.TELEMETRY, topic, lambda epoch, seq, b=body: b)
    uplink = UplinkLoop(settings, outbox, metrics, shop="shop-a", node="pi-1", on_downlink=lambda m: None, ack=ack,
                        subscriptions=[Topics.node("shop-a", "pi-1", "commands")])
    uplink.start()
    try:
        got = ctl.received_until(OWN)
        got += ctl.received_until(OWN)
        assert got == [(OWN, b"ok-1"), (OWN, b"ok-2")]  # the forged one never reached anyone
        wait_for(lambda: _value(registry, "shopfleet_agent_publishes_refused_total", reason="not_authorized") == 1,
                 what="the refusal to be counted")
        # The refused message left the outbox (it would be refused forever) and is not "sent".
        wait_for(lambda: b"forged" not in [m.payload for m in outbox.peek(0, 10)], what="the refused message to leave the outbox")
        if ack == "broker":
            wait_for(lambda: outbox.depth() == 0, what="the accepted messages to leave the outbox")
            assert _value(registry, "shopfleet_agent_messages_sent_total", kind="telemetry") == 2
        else:  # the accepted ones wait for the controller's stored-ack
            assert sorted(m.payload for m in outbox.peek(0, 10)) == [b"ok-1", b"ok-2"]
            assert _value(registry, "shopfleet_agent_messages_sent_total", kind="telemetry") == 0
        assert uplink.refusal_report() == {"mqtt_publishes_refused_total": 1.0}
    finally:
        uplink.stop(drain_timeout=1)
        outbox.close()
        ctl.close()


def test_mqtt311_broker_acknowledges_a_refused_publish_like_any_other(deploy, tmp_path):
    """Why the agent needs MQTT 5 to see refusals: on 3.1.1 the forged message counts as sent."""
    dep = deploy()
    dep.central()
    node = dep.creds["nodes"]["shop-a/pi-1"]
    settings = MqttSettings(host="127.0.0.1", port=dep.options.port, client_id="agent-shop-a-pi-1",
                            username=node["username"], password=node["password"], protocol="3.1.1")
    outbox = Outbox(tmp_path / "outbox.db", synchronous="normal")
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    outbox.enqueue("telemetry", Priority.TELEMETRY, FOREIGN, lambda epoch, seq: b"forged")
    uplink = UplinkLoop(settings, outbox, metrics, shop="shop-a", node="pi-1", on_downlink=lambda m: None, ack="broker",
                        subscriptions=[])
    uplink.start()
    try:
        wait_for(lambda: outbox.depth() == 0, what="the broker's PUBACK")
        assert _value(registry, "shopfleet_agent_messages_sent_total", kind="telemetry") == 1
        assert _value(registry, "shopfleet_agent_publishes_refused_total", reason="not_authorized") == 0
        assert uplink.refusal_report() == {}
    finally:
        uplink.stop(drain_timeout=1)
        outbox.close()


def test_agent_reports_refusals_in_its_heartbeat(deploy, tmp_path):
    """A node whose broker ACL lacks a channel (an ACL older than the agent): the event is refused, the heartbeat says so."""
    dep = deploy()
    acl = dep.files.acl_file
    acl.write_text(acl.read_text().replace(f"topic write {Topics.node('shop-a', 'pi-1', 'events')}\n", ""))
    dep.central()
    creds = dep.creds
    ctl = Client(dep.options.tls_port, tls=tls_of(dep, creds["controller"]["username"]))
    ctl.subscribe("fleet/v1/shop-a/pi-1/#")
    node = creds["nodes"]["shop-a/pi-1"]
    config = validate_config({
        "shop": "shop-a", "node": "pi-1", "heartbeat_interval_s": 3600,
        "broker": {"port": dep.options.port, "username": node["username"], "password": node["password"], "protocol": "5"},
        "uplink": {"ack": "broker"},
        "outbox": {"path": str(tmp_path / "outbox.db"), "synchronous": "normal"},
    })
    agent = Agent(config, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))
    agent.start()
    try:
        assert agent.wait_connected(10)
        agent.send(Event, type="door_opened")
        wait_for(lambda: _value(agent.registry, "shopfleet_agent_publishes_refused_total", reason="not_authorized") == 1,
                 what="the refused event to be counted")
        seq = agent.heartbeat()
        beats: list[dict] = []

        def beat_of_seq() -> dict | None:
            beats.extend(json.loads(p) for _, p in _drain(ctl) if b'"heartbeat"' in p)
            return next((b for b in beats if b["seq"] == seq), None)

        beat = wait_for(beat_of_seq, what="the heartbeat sent after the refusal at the controller")
        assert beat["metrics"]["mqtt_publishes_refused_total"] == 1.0
        assert agent.outbox.depth() == 0
    finally:
        agent.stop(timeout=2)
        ctl.close()


def _drain(client: Client) -> list[tuple[str, bytes]]:
    out = []
    while not client.got.empty():
        out.append(client.got.get_nowait())
    return out

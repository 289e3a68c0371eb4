"""The agent in-process against a real Mosquitto: birth, heartbeats, commands, bad downlink,
desired state, clock beacons, pipelines' events and readings, outage and eviction, /metrics."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import Agent, ReadingBatcher
from edge_agent.config import validate_config
from edge_agent.facts import SystemFacts
from edge_agent.mqtt import InMessage
from edge_agent.protocol import (
    MAX_PAYLOAD_BYTES,
    Channel,
    ClockBeacon,
    Command,
    CommandResult,
    ControllerPresence,
    DesiredState,
    Heartbeat,
    Reading,
    ReportedState,
    Telemetry,
    Topics,
    encode,
)
from edge_agent.supervisor import EventSink, PipelineConfigBase
from shopfleet.broker import BrokerProcess, free_port
from tests.support.inproc import NODE, SHOP, sample, uplinks
from tests.support.recorder import Recorder, publish, wait_for


def command(name: str, ttl: float = 30, **args: Any) -> Command:
    return Command(name=name, args=args, expires_at=time.time() + ttl)


def test_birth_and_heartbeat_follow_the_protocol(make_agent, recorder: Recorder) -> None:
    agent = make_agent()
    wait_for(lambda: uplinks(recorder, Channel.TELEMETRY), 10, "the first heartbeat")
    presence = wait_for(lambda: uplinks(recorder, Channel.PRESENCE), 10, "birth")
    assert presence[0].state == "online" and presence[0].session == 1
    hb = uplinks(recorder, Channel.TELEMETRY)[0]
    assert isinstance(hb, Heartbeat) and hb.seq == 1 and hb.epoch == agent.outbox.epoch
    assert hb.facts.cpu_count >= 1 and hb.interval_s == 30
    # counted right after it is enqueued; the uplink thread may have sent it a moment before
    wait_for(lambda: sample(agent, "shopfleet_agent_heartbeats_total") >= 1, 10, "the heartbeat counted")
    wait_for(lambda: sample(agent, "shopfleet_agent_messages_sent_total", kind="heartbeat") >= 1, 10, "the PUBACK")
    wait_for(lambda: agent.outbox.depth() == 0, 10, "the outbox to drain")


def test_send_fills_identity_and_routes_reported_state_retained(make_agent, broker: BrokerProcess, recorder: Recorder) -> None:
    agent = make_agent()
    wait_for(lambda: agent.heartbeats_sent == 1, 10, "the start-up heartbeat (the next is 30 s away)")
    seq = agent.send(ReportedState, release="r-7", revision=7, status="applied")
    got = wait_for(lambda: uplinks(recorder, "state/reported"), 10, "reported state")
    assert got[0].seq == seq and got[0].revision == 7 and got[0].shop == SHOP and got[0].node == NODE
    late = Recorder(broker.port, (Topics.reported(SHOP, NODE),))  # retained: a late subscriber gets it
    try:
        wait_for(lambda: late.messages and late.messages[0][2], 10, "the retained reported state")
    finally:
        late.close()
    with pytest.raises(ValueError):
        agent.send(ReportedState, revision=-1, status="applied")
    assert agent.send(ReportedState, revision=8, status="applying") == seq + 1  # the invalid one used no seq


def test_ping_unknown_failing_and_expired_commands(make_agent, broker: BrokerProcess, recorder: Recorder, tmp_path: Path) -> None:
    from fleet_controller.rollout.signing import generate_keypair
    from fleet_controller.web.remote_actions import CommandSigner

    generate_keypair(tmp_path / "signing.key")
    signer = CommandSigner.from_file(tmp_path / "signing.key")
    agent = make_agent(config={"commands": {"public_keys": [str(tmp_path / "signing.pub")]}})

    def boom(cmd: Command) -> dict:
        raise RuntimeError(f"cannot tare {cmd.args['board']}")

    agent.register_command("tare", boom)
    topic = Topics.node(SHOP, NODE, Channel.COMMANDS)
    ping, expired = command("ping"), command("ping", ttl=-1)  # ping may come unsigned
    unknown, failing = (signer.sign(c.model_copy(update={"shop": SHOP, "node": NODE, "counter": i}))
                        for i, c in enumerate((command("reboot"), command("tare", board="b1")), 1))
    for c in (expired, ping, unknown, failing):
        publish(broker.port, topic, encode(c))
    replies = wait_for(lambda: len(uplinks(recorder, Channel.REPLIES)) >= 3 and uplinks(recorder, Channel.REPLIES), 10, "3 replies")
    by_id = {r.correlation_id: r for r in replies}
    assert isinstance(by_id[ping.correlation_id], CommandResult)
    assert by_id[ping.correlation_id].ok and by_id[ping.correlation_id].result["pong"] is True
    assert not by_id[unknown.correlation_id].ok and "knows: ping, restart_pipeline, tare" in by_id[unknown.correlation_id].error
    assert not by_id[failing.correlation_id].ok and "cannot tare b1" in by_id[failing.correlation_id].error
    assert expired.correlation_id not in by_id
    assert sample(agent, "shopfleet_agent_commands_total", name="ping", outcome="expired") == 1
    assert sample(agent, "shopfleet_agent_commands_total", name="ping", outcome="ok") == 1
    assert sample(agent, "shopfleet_agent_commands_total", name="_unknown", outcome="unknown") == 1
    assert sample(agent, "shopfleet_agent_commands_total", name="tare", outcome="error") == 1


BAD_DOWNLINK = [
    pytest.param("commands", b"{not json", "bad_json", id="bad-json"),
    pytest.param("commands", b'"a string"', "bad_json", id="json-not-object"),
    pytest.param("commands", b'{"v": 2, "kind": "command"}', "version", id="future-version"),
    pytest.param("commands", b'{"v": 1, "kind": "command", "name": "ping"}', "schema", id="missing-expiry"),
    pytest.param("commands", b'{"v": 1, "name": "ping", "expires_at": "soon"}', "schema", id="wrong-type"),
    pytest.param("commands", b'{"v": 1}' + b" " * (MAX_PAYLOAD_BYTES + 1), "too_large", id="huge"),
    pytest.param("desired", encode(DesiredState(shop="other-shop", release="r", revision=1, objects=())), "identity_mismatch", id="other-shops-state"),
]


@pytest.mark.parametrize(("where", "payload", "reason"), BAD_DOWNLINK)
def test_bad_downlink_is_counted_and_the_loop_survives(make_agent, broker, recorder, where: str, payload: bytes, reason: str) -> None:
    agent = make_agent()
    topic = Topics.node(SHOP, NODE, Channel.COMMANDS) if where == "commands" else Topics.desired(SHOP)
    publish(broker.port, topic, payload)
    wait_for(lambda: sample(agent, "shopfleet_agent_downlink_rejected_total", reason=reason) == 1, 10, f"rejection {reason}")
    ping = command("ping")
    publish(broker.port, Topics.node(SHOP, NODE, Channel.COMMANDS), encode(ping))
    wait_for(lambda: any(r.correlation_id == ping.correlation_id for r in uplinks(recorder, Channel.REPLIES)), 10, "ping reply after bad input")


def test_desired_state_handler_gets_each_new_state_and_survives_errors(make_agent, broker: BrokerProcess) -> None:
    seen: list[int] = []
    failed = threading.Event()

    def handler(desired: DesiredState) -> None:
        seen.append(desired.revision)
        if desired.revision == 1:
            failed.set()
            raise RuntimeError("apply failed")

    agent = make_agent()
    agent.register_desired_state_handler(handler)
    for rev in (1, 2):
        publish(broker.port, Topics.desired(SHOP), encode(DesiredState(shop=SHOP, release=f"r{rev}", revision=rev, objects=())), retain=True)
        wait_for(lambda rev=rev: rev in seen, 10, f"revision {rev} handled")
    # The handler returns before the outcome is counted: wait on the counters, not on `seen`.
    wait_for(lambda: sample(agent, "shopfleet_agent_desired_states_total", outcome="handled") == 1, 10, "revision 2 counted")
    assert sample(agent, "shopfleet_agent_desired_states_total", outcome="error") == 1
    # a reconnect redelivers the retained state; the handler is not called again for it
    broker.restart()
    wait_for(lambda: sample(agent, "shopfleet_agent_reconnects_total") == 1 and agent.uplink.connected.is_set(), 20, "reconnect")
    wait_for(lambda: sample(agent, "shopfleet_agent_downlink_received_total", kind="desired_state") >= 3, 10, "redelivery")
    assert seen == [1, 2]


def test_retained_desired_state_reaches_a_handler_passed_at_construction(make_agent, broker: BrokerProcess) -> None:
    publish(broker.port, Topics.desired(SHOP), encode(DesiredState(shop=SHOP, release="r", revision=5, objects=())), retain=True)
    seen: list[int] = []
    make_agent(desired_state_handler=lambda d: seen.append(d.revision))
    wait_for(lambda: seen == [5], 10, "the retained desired state")


def test_clock_beacon_sets_offset_in_next_heartbeat(make_agent, broker: BrokerProcess, recorder: Recorder) -> None:
    agent = make_agent()
    assert sample(agent, "shopfleet_agent_controller_online") == -1
    publish(broker.port, Topics.controller_presence, encode(ControllerPresence(state="online", instance="c1")), retain=True)
    wait_for(lambda: sample(agent, "shopfleet_agent_controller_online") == 1, 10, "the controller's presence")
    publish(broker.port, Topics.controller_clock, encode(ClockBeacon(instance="c1", ts=time.time() + 100)))
    wait_for(lambda: agent.clock.offset() is not None, 10, "the beacon")
    agent.heartbeat()
    hb = wait_for(lambda: [h for h in uplinks(recorder, Channel.TELEMETRY) if h.facts.clock_offset_s is not None], 10, "heartbeat with offset")
    assert 99 < hb[0].facts.clock_offset_s <= 100
    assert 99 < sample(agent, "shopfleet_agent_clock_offset_seconds") <= 100


class Chatty:
    """A pipeline that sends readings and one valid and one invalid event."""

    kind = "test"
    name = "chatty"

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        sink.event("door_opened", "", {"door": "front"})
        sink.event("x" * 100, "", {})  # type longer than the protocol allows
        for v in (1.0, 2.0, 6.0):
            sink.readings([Reading(name="temperature_c", value=v, source="fridge-1")])
        sink.readings([Reading(name="weight_g", value=5.0, source="shelf-1")])
        stop.wait()

    def health(self) -> dict[str, Any]:
        return {"fps": 12.5, "errors_by_reason": {"crc": 2}}


def test_pipeline_events_readings_health_and_metrics(make_agent, recorder: Recorder) -> None:
    port = free_port()
    policy = PipelineConfigBase(name="chatty", telemetry_interval_s=0.3, telemetry_reduce="mean")
    agent = make_agent(config={"metrics": {"port": port, "host": "127.0.0.1"}}, extra_pipelines=[(Chatty(), policy)])
    events = wait_for(lambda: uplinks(recorder, Channel.EVENTS), 10, "the event")
    assert events[0].type == "door_opened" and events[0].source == "chatty"
    tel = wait_for(lambda: [m for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Telemetry)], 10, "telemetry")
    values = {(r.name, r.source): r.value for r in tel[0].readings}
    assert values == {("temperature_c", "fridge-1"): 3.0, ("weight_g", "shelf-1"): 5.0}
    assert sample(agent, "shopfleet_agent_sink_rejected_total", pipeline="chatty", reason="event_invalid") == 1
    agent.heartbeat()
    hb = wait_for(
        lambda: [m for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Heartbeat) and m.pipelines["chatty"].state == "running"],
        10,
        "a heartbeat showing the pipeline running",
    )
    assert hb[-1].pipelines["chatty"].fps == 12.5 and hb[-1].pipelines["chatty"].kind == "test"
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in (
        "shopfleet_agent_outbox_depth{",
        "shopfleet_agent_outbox_bytes",
        "shopfleet_agent_messages_sent_total{",
        "shopfleet_agent_outbox_evicted_total",
        "shopfleet_agent_reconnects_total",
        "shopfleet_agent_last_ack_age_seconds",
        "shopfleet_agent_downlink_rejected_total",
        "shopfleet_agent_heartbeats_total",
        "shopfleet_agent_pipeline_restarts_total",
        'shopfleet_agent_pipeline_state{pipeline="chatty",shopfleet_agent_pipeline_state="running"} 1.0',
        'shopfleet_agent_pipeline_errors_total{pipeline="chatty",reason="crc"} 2.0',
    ):
        assert name in body, name
    age = next(line for line in body.splitlines() if line.startswith("shopfleet_agent_last_ack_age_seconds "))
    assert 0 <= float(age.split()[1]) < 30


def test_outage_fills_outbox_evicts_telemetry_first_then_drains_in_order(make_agent, broker: BrokerProcess) -> None:
    recorder = Recorder(broker.port, persistent=True)  # its session outlives the broker restart
    agent = make_agent(config={"outbox": {"max_messages": 10}})
    agent.send(ReportedState, revision=1, status="applying")
    wait_for(lambda: agent.outbox.depth() == 0, 10, "the first messages to be acknowledged")
    broker.stop()
    wait_for(lambda: not agent.uplink.connected.is_set(), 10, "the agent to notice the outage")
    important = [agent.send(ReportedState, revision=r, status="applied") for r in range(2, 5)]
    for _ in range(12):
        agent.heartbeat()
    assert agent.outbox.depth() == 10
    assert sample(agent, "shopfleet_agent_outbox_evicted_total", priority="telemetry") == 5
    assert sample(agent, "shopfleet_agent_outbox_evicted_total", priority="important") == 0
    assert sample(agent, "shopfleet_agent_outbox_depth", priority="important") == 3
    broker.start()
    wait_for(lambda: agent.outbox.depth() == 0, 20, "the outbox to drain after the outage")
    assert sample(agent, "shopfleet_agent_reconnects_total") >= 1
    wait_for(lambda: set(important) <= {m.seq for m in uplinks(recorder, "state/reported")}, 20, "the events kept through the outage")
    kept = set(important) | set(range(11, 18))  # heartbeats 6..10 were the oldest telemetry, evicted

    def replayed() -> list[int] | None:
        # every uplink in arrival order, without the retained reported state re-sent on resubscribe
        arrival = [p["seq"] for p in recorder.payloads(live_only=True) if p.get("seq", 0) > 2]
        return arrival if set(arrival) >= kept else None

    arrival = wait_for(replayed, 10, "every kept message to arrive")
    assert set(arrival) == kept
    assert arrival == sorted(arrival), "replay after the outage is in seq order"
    recorder.close()


def test_reading_batcher_reductions() -> None:
    for reduce, expected in (("mean", 2.0), ("last", 3.0), ("min", 1.0), ("max", 3.0)):
        b = ReadingBatcher(reduce)
        b.add([Reading(name="t", value=v, labels={"k": "1"}) for v in (1.0, 2.0, 3.0)])
        b.add([Reading(name="t", value=9.0, labels={"k": "2"})])
        out = {r.labels["k"]: r.value for r in b.take()}
        assert out == {"1": expected, "2": 9.0}, reduce
        assert b.take() == []


def test_graceful_stop_sends_offline_and_flushes(make_agent, broker: BrokerProcess, recorder: Recorder) -> None:
    agent = make_agent()
    for i in range(20):
        agent.send(ReportedState, revision=i, status="applied")
    agent.stop(timeout=10)
    wait_for(lambda: [p for p in uplinks(recorder, Channel.PRESENCE) if p.state == "offline"], 10, "offline presence")
    offline = next(p for p in uplinks(recorder, Channel.PRESENCE) if p.state == "offline")
    assert offline.reason == "shutdown" and offline.session == 1
    assert len(uplinks(recorder, "state/reported")) == 20  # all flushed before the goodbye


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    leaf=st.sampled_from(["commands", "state/desired", "_controller/clock", "_controller/presence", "telemetry"]),
    payload=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["v", "kind", "name", "expires_at", "shop", "revision", "objects", "ts", "instance", "state", "x"]),
            st.one_of(st.integers(-2, 3), st.text(max_size=5), st.none(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2)),
        ).map(lambda d: json.dumps(d).encode()),
    ),
)
def test_any_downlink_payload_is_handled_or_counted_never_raised(idle_agent: Agent, leaf: str, payload: bytes) -> None:
    topic = f"fleet/v1/{SHOP}/{NODE}/commands" if leaf == "commands" else (
        f"fleet/v1/{SHOP}/{leaf}" if leaf.startswith("state") else (f"fleet/v1/{leaf}" if leaf.startswith("_") else f"fleet/v1/{SHOP}/{NODE}/{leaf}")
    )
    before = family_total(idle_agent, "shopfleet_agent_downlink_rejected") + family_total(idle_agent, "shopfleet_agent_downlink_received")
    idle_agent._on_downlink(InMessage(topic=topic, payload=payload, retain=False))
    after = family_total(idle_agent, "shopfleet_agent_downlink_rejected") + family_total(idle_agent, "shopfleet_agent_downlink_received")
    assert after == before + 1, "every message is either accepted or counted as rejected"


def family_total(agent: Agent, family: str) -> float:
    return sum(s.value for m in agent.registry.collect() if m.name == family for s in m.samples if s.name.endswith("_total"))


@pytest.fixture
def idle_agent(tmp_path: Path) -> Iterator[Agent]:
    """An agent that is built but not started: its downlink handler is called directly."""
    cfg = validate_config({"shop": SHOP, "node": NODE, "outbox": {"path": str(tmp_path / "idle.db"), "synchronous": "normal"}})
    agent = Agent(cfg, facts_provider=SystemFacts(probe=False, disk_path=tmp_path))
    yield agent
    agent.outbox.close()


class Gauging:
    """A pipeline that reports gate metrics (good and bad ones), then fails when told to."""

    kind = "test"

    def __init__(self, name: str, fps: float, error_ratio: float) -> None:
        self.name, self.fps, self.error_ratio = name, fps, error_ratio
        self.fail = threading.Event()

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        sink.gate_metric("fps", self.fps, "lower")
        sink.gate_metric("error_ratio", self.error_ratio)  # higher is worse by default
        sink.gate_metric("Bad Name", 1.0)
        sink.gate_metric("nan_metric", float("nan"))
        while not stop.wait(0.05):
            if self.fail.is_set():
                raise RuntimeError("told to fail")

    def health(self) -> dict[str, Any]:
        return {}


def test_gate_metrics_from_pipelines_reach_the_heartbeat_worst_value_per_name(make_agent, recorder: Recorder) -> None:
    fast, slow = Gauging("fast", 15.0, 0.01), Gauging("slow", 4.0, 0.002)
    policy = {"restart_backoff_s": 30.0, "restart_backoff_max_s": 60.0}
    agent = make_agent(extra_pipelines=[(p, PipelineConfigBase(name=p.name, **policy)) for p in (fast, slow)])
    # the slowest camera's fps, the highest error ratio
    wait_for(lambda: agent.gate_metrics() == {"fps": 4.0, "error_ratio": 0.01}, 10, "both pipelines' gate metrics, worst per name")
    wait_for(lambda: sample(agent, "shopfleet_agent_sink_rejected_total", pipeline="fast", reason="gate_metric_invalid") == 2, 10,
             "the bad name and the NaN counted and dropped")
    agent.heartbeat()
    hb = wait_for(lambda: [m for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Heartbeat) and m.metrics], 10, "the heartbeat")
    assert hb[-1].metrics == {"fps": 4.0, "error_ratio": 0.01}
    slow.fail.set()  # a pipeline that stops running no longer speaks for the node
    wait_for(lambda: agent.gate_metrics() == {"fps": 15.0, "error_ratio": 0.01}, 10, "the failed pipeline's figures dropped")

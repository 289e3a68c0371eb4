"""The controller process end to end over a real Mosquitto: intake, presence, bad input, persistence, extension points."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal

import httpx
import paho.mqtt.client as paho
import pytest
from fastapi import APIRouter, HTTPException, Request
from fastapi.params import Depends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.protocol import REJECT_REASONS as REASONS
from edge_agent.protocol import ClockBeacon, ControllerPresence, Topics, encode, parse_downlink
from fleet_controller.service import ControllerService
from tests.support.controller import (
    Node,
    RunningController,
    controller_settings,
    event,
    heartbeat,
    presence,
    telemetry,
)
from tests.support.wait import wait_for


def node_row(rc: RunningController, shop: str = "shop-a", node: str = "pi-1") -> dict:
    try:
        return rc.service.reader.get_node(shop, node, history=1000).model_dump()
    except LookupError:
        return {}


def test_messages_flow_to_the_api(controller, broker):
    n = Node(broker)
    n.send(presence(), retain=True)
    for s in range(1, 4):
        n.send(heartbeat(seq=s))
    n.send(telemetry(seq=4, value=6.5))
    n.send(event(seq=5))
    wait_for(lambda: node_row(controller).get("watermark") == 5, what="5 messages stored")
    wait_for(lambda: controller.metric("shopfleet_controller_ingested_total", kind="event") == 1, what="metrics of the last batch")
    with httpx.Client(base_url=controller.service.api_url) as http:
        shop = http.get("/api/v1/shops/shop-a").json()
        assert [(x["node"], x["presence"]) for x in shop["nodes"]] == [("pi-1", "online")]
        assert [(r["name"], r["value"]) for r in shop["readings"]] == [("temperature_c", 6.5)]
        assert [h["seq"] for h in http.get("/api/v1/shops/shop-a/nodes/pi-1").json()["history"]] == [3, 2, 1]
        assert http.get("/healthz").json()["status"] == "ok"
        text = http.get("/metrics").text
    assert 'shopfleet_controller_ingested_total{kind="heartbeat"} 3.0' in text
    assert 'shopfleet_controller_nodes{presence="online"} 1.0' in text
    n.close()


def test_a_report_from_an_unknown_node_is_refused_without_holding_up_the_others(controller, broker):
    """A report never creates a node: refused and counted at once, while the rest of its batch is stored as usual.

    (It used to make the node update's compare-and-set miss the absent row, read as another writer's
    move: the whole batch was decided again 20 times, then stored message by message, and the
    report quarantined as a store failure.)
    """
    from edge_agent.protocol import ReportedState

    known = Node(broker)
    known.send(presence(), retain=True)
    known.send(heartbeat(seq=1))
    wait_for(lambda: node_row(controller).get("watermark") == 1, what="the known node stored")
    ghost = Node(broker, node="ghost-1", will=False)
    for seq in (1, 2):
        ghost.send(ReportedState(shop="shop-a", node="ghost-1", epoch="ep1", seq=seq, revision=7, status="applied", release="r1"),
                   topic=Topics.reported("shop-a", "ghost-1"))
        known.send(heartbeat(seq=seq + 1))
    wait_for(lambda: controller.metric("shopfleet_controller_rejected_total", reason="unknown_node") == 2,
             what="both refused reports counted")
    wait_for(lambda: node_row(controller).get("watermark") == 3, what="the known node's heartbeats around them stored")
    assert controller.metric("shopfleet_controller_quarantined_total", reason="store") in (None, 0)
    assert controller.metric("shopfleet_controller_cursor_conflicts_total") in (None, 0)
    with httpx.Client(base_url=controller.service.api_url) as http:
        assert 'shopfleet_controller_rejected_total{reason="unknown_node"} 2.0' in http.get("/metrics").text
        assert http.get("/api/v1/shops/shop-a/nodes/ghost-1").status_code == 404  # no node was created
    known.close()
    ghost.close()


def test_controller_presence_and_clock_beacon(controller, broker):
    got: queue.Queue = queue.Queue()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="watcher")
    c.on_message = lambda cl, u, m: got.put(parse_downlink(m.topic, m.payload))
    c.connect("127.0.0.1", broker.port)
    c.subscribe([(Topics.controller_presence, 1), (Topics.controller_clock, 0)])
    c.loop_start()
    seen = [got.get(timeout=10), got.get(timeout=10)]
    kinds = {type(m) for m in seen}
    assert kinds == {ControllerPresence, ClockBeacon}
    pres = next(m for m in seen if isinstance(m, ControllerPresence))
    assert (pres.state, pres.instance) == ("online", controller.settings.instance)
    controller.stop()
    while not isinstance(last := got.get(timeout=10), ControllerPresence):
        pass  # clock beacons still in flight
    assert (last.state, last.instance) == ("offline", controller.settings.instance)
    c.loop_stop()


def test_controller_crash_publishes_its_will(controller, broker):
    got: queue.Queue = queue.Queue()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="will-watcher")
    c.on_message = lambda cl, u, m: got.put(parse_downlink(m.topic, m.payload))
    c.connect("127.0.0.1", broker.port)
    c.subscribe(Topics.controller_presence, qos=1)
    c.loop_start()
    assert got.get(timeout=10).state == "online"  # the retained birth
    controller.service.mqtt.stop(graceful=False)
    will = got.get(timeout=30)
    assert (will.state, will.instance) == ("offline", controller.settings.instance)
    c.loop_stop()


def test_will_marks_offline_and_a_late_will_of_an_old_session_does_not(controller, broker):
    first = Node(broker, session=1)
    first.send(presence(session=1), retain=True)
    first.send(heartbeat(seq=1))
    wait_for(lambda: node_row(controller).get("presence") == "online", what="online")
    first.kill()  # the broker publishes the session-1 Will after the keepalive lapses or at once on socket close
    wait_for(lambda: node_row(controller).get("presence") == "offline", timeout=20, what="offline via the Will")
    assert node_row(controller)["presence_reason"] == "will"
    second = Node(broker, session=2)
    second.send(presence(session=2), retain=True)
    wait_for(lambda: node_row(controller).get("session") == 2 and node_row(controller)["presence"] == "online", what="online again")
    second.send(presence(state="offline", session=1))  # the old Will, arriving late
    second.send(heartbeat(seq=2))
    wait_for(lambda: node_row(controller).get("watermark") == 2, what="message after the late Will")
    assert (node_row(controller)["presence"], node_row(controller)["session"]) == ("online", 2)
    second.close()


def test_silence_makes_a_node_stale_then_offline(broker, tmp_path):
    rc = RunningController(controller_settings(broker, tmp_path, presence={"stale_after_intervals": 2, "offline_after_intervals": 4, "sweep_interval_s": 0.1}))
    try:
        n = Node(broker, will=False)
        n.send(heartbeat(seq=1, interval=0.3))
        wait_for(lambda: node_row(rc).get("presence") == "online", what="online")
        wait_for(lambda: node_row(rc).get("presence") == "stale", what="stale")
        wait_for(lambda: node_row(rc).get("presence") == "offline", what="offline")
        assert node_row(rc)["presence_reason"] == "timeout"
        n.send(heartbeat(seq=2, interval=10))
        wait_for(lambda: node_row(rc).get("presence") == "online", what="back online")
        n.close()
    finally:
        rc.stop()


def test_a_mass_outage_is_marked_over_several_sweeps_and_counted(broker, tmp_path):
    """Five nodes fall silent together; sweeps of at most two mark them all, and the capped sweeps are counted."""
    rc = RunningController(controller_settings(broker, tmp_path, presence={
        "stale_after_intervals": 2, "offline_after_intervals": 4, "sweep_interval_s": 0.1, "sweep_max_changes": 2}))
    capped = lambda: rc.service.metrics.registry.get_sample_value("shopfleet_controller_presence_sweeps_capped_total")  # noqa: E731
    try:
        nodes = [Node(broker, node=f"pi-{i}", will=False) for i in range(5)]
        assert capped() == 0
        # A sweep may run between two sends; the nodes' interval is long enough that none of them is stale by then.
        for i, n in enumerate(nodes):
            n.send(heartbeat(node=f"pi-{i}", seq=1, interval=1.0))
        wait_for(lambda: all(node_row(rc, node=f"pi-{i}").get("presence") == "online" for i in range(5)), what="all online")
        wait_for(lambda: all(node_row(rc, node=f"pi-{i}").get("presence") == "offline" for i in range(5)), what="all offline")
        assert capped() >= 2  # 5 going stale take three sweeps of two, so do 5 going offline: at least two capped
        for n in nodes:
            n.close()
    finally:
        rc.stop()


HAND_PICKED = [
    pytest.param("telemetry", b"{oops", "bad_json", id="bad-json"),
    pytest.param("telemetry", json.dumps({**json.loads(encode(heartbeat(seq=1))), "seq": "x"}).encode(), "schema", id="wrong-type"),
    pytest.param("telemetry", json.dumps({**json.loads(encode(heartbeat(seq=1))), "v": 99}).encode(), "version", id="wrong-version"),
    pytest.param("telemetry", b'{"v": 1, "pad": "' + b"x" * 300_000 + b'"}', "too_large", id="huge"),
    pytest.param("telemetry", encode(heartbeat(shop="shop-b", seq=1)), "identity_mismatch", id="topic-payload-mismatch"),
    pytest.param("events", encode(heartbeat(seq=1)), "kind_mismatch", id="kind-on-wrong-topic"),
]


@pytest.mark.parametrize(("channel", "payload", "reason"), HAND_PICKED)
def test_bad_input_over_the_broker(controller, broker, channel, payload, reason):
    n = Node(broker, will=False)
    n.send(payload, Topics.node("shop-a", "pi-1", channel))
    n.send(heartbeat(seq=1))
    wait_for(lambda: node_row(controller).get("watermark") == 1, what="the valid message after the bad one")
    # Metrics are recorded just after the commit the database shows: wait for them too.
    wait_for(lambda: controller.metric("shopfleet_controller_ingested_total", kind="heartbeat") == 1, what="metrics")
    assert controller.metric("shopfleet_controller_rejected_total", reason=reason) == 1
    n.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    channel=st.sampled_from(["telemetry", "events", "presence", "replies"]),
    payload=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.none()), max_size=6)),
        st.builds(lambda s: json.dumps({**json.loads(encode(heartbeat(seq=1))), "seq": s}).encode(), st.one_of(
            st.integers(max_value=0), st.text(alphabet="abcxyz-", min_size=1, max_size=5),
            st.floats().filter(lambda f: not f.is_integer()), st.none())),
    ),
)
def test_generated_garbage_over_the_broker(controller, broker, channel, payload):
    n = Node(broker, will=False)
    seq = (node_row(controller).get("watermark") or 0) + 1
    rejected_before = sum(controller.metric("shopfleet_controller_rejected_total", reason=r) for r in REASONS)
    n.send(payload, Topics.node("shop-a", "pi-1", channel))
    n.send(heartbeat(seq=seq))
    wait_for(lambda: node_row(controller).get("watermark") == seq, what=f"valid seq {seq} after garbage")
    wait_for(lambda: controller.metric("shopfleet_controller_ingested_total", kind="heartbeat") == seq, what="metrics")
    assert sum(controller.metric("shopfleet_controller_rejected_total", reason=r) for r in REASONS) == rejected_before + 1
    assert controller.service.health()["status"] == "ok"
    n.close()


def test_persistent_session_gets_what_was_sent_while_down(broker, tmp_path):
    settings_ = controller_settings(broker, tmp_path, broker={"client_id": "ctl-persist"})
    rc = RunningController(settings_)
    n = Node(broker, will=False)
    n.send(heartbeat(seq=1))
    wait_for(lambda: node_row(rc).get("watermark") == 1, what="first message")
    rc.stop()
    for s in range(2, 22):
        n.send(heartbeat(seq=s))
    rc = RunningController(settings_)
    try:
        wait_for(lambda: node_row(rc).get("watermark") == 21, what="messages queued while the controller was down")
        row = node_row(rc)
        assert (row["messages_total"], row["open_gaps"], row["duplicates_total"]) == (21, 0, 0)
        assert sorted(h["seq"] for h in row["history"]) == list(range(1, 22))
    finally:
        n.close()
        rc.stop()


async def test_extension_points_in_process(broker, tmp_path):
    svc = ControllerService(controller_settings(broker, tmp_path))
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 2:
            raise RuntimeError("first run fails")
        await asyncio.Event().wait()

    svc.add_worker("flaky", flaky)
    router = APIRouter()

    @router.get("/api/v1/extra")
    def extra(request: Request) -> dict:
        return {"has_bus": request.app.state.bus is svc.bus}

    def guard(request: Request) -> None:
        if request.headers.get("x-token") != "t0k":
            raise HTTPException(401, "missing token")

    svc.add_router(router)
    svc.add_dependency(Depends(guard))
    await svc.start()
    try:
        with pytest.raises(RuntimeError, match="before"):
            svc.add_router(APIRouter())
        async with svc.bus.subscribe({"node_added", "presence"}) as sub:
            n = Node(broker, will=False)
            await asyncio.to_thread(n.send, heartbeat(seq=1))
            got = [await asyncio.wait_for(sub.get(), 10), await asyncio.wait_for(sub.get(), 10)]
            assert {(e.topic, e.node) for e in got} == {("node_added", "pi-1"), ("presence", "pi-1")}
            n.close()
        await svc.mqtt.publish(Topics.desired("shop-a"), b"{}", retain=True, qos=1)
        async with httpx.AsyncClient(base_url=svc.api_url) as http:
            assert (await http.get("/api/v1/extra")).status_code == 401
            assert (await http.get("/api/v1/extra", headers={"x-token": "t0k"})).json() == {"has_bus": True}
            assert (await http.get("/api/v1/shops", headers={"x-token": "t0k"})).status_code == 200
        deadline = asyncio.get_running_loop().time() + 10
        while len(runs) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert len(runs) == 2 and svc.health()["workers"] == {"flaky": "running"}
        assert svc.metrics_registry.get_sample_value("shopfleet_controller_worker_restarts_total", {"worker": "flaky"}) == 1
    finally:
        await svc.stop()


def test_mqtt5_shared_subscription_and_session_expiry(broker, tmp_path):
    """With protocol 5 and a shared group the controller subscribes as $share/<group>/... and keeps its session."""
    settings_ = controller_settings(broker, tmp_path, broker={"protocol": "5", "shared_group": "controllers", "client_id": "ctl-v5"})
    rc = RunningController(settings_)
    n = Node(broker, will=False)
    try:
        n.send(heartbeat(seq=1))
        wait_for(lambda: node_row(rc).get("watermark") == 1, what="message via the shared subscription")
        rc.stop()
        for s in (2, 3):
            n.send(heartbeat(seq=s))
        rc = RunningController(settings_)
        wait_for(lambda: node_row(rc).get("watermark") == 3, what="messages queued in the MQTT 5 session")
        assert node_row(rc)["open_gaps"] == 0
    finally:
        n.close()
        rc.stop()


def test_a_killed_registry_writer_is_replaced_and_nothing_is_lost(controller, broker):
    n = Node(broker, will=False)
    n.send(heartbeat(seq=1))
    wait_for(lambda: node_row(controller).get("watermark") == 1, what="first message")
    pid = controller.call(controller.service.writer.call("ping"))
    os.kill(pid, signal.SIGKILL)
    for s in (2, 3, 4):
        n.send(heartbeat(seq=s))
    # The batch the dead writer held is retried after the next one may already be stored by the
    # new writer: it then arrives as a late message that fills its gap.
    wait_for(lambda: node_row(controller).get("messages_total") == 4, timeout=30, what="messages stored by a new writer")
    row = node_row(controller)
    assert (row["watermark"], row["open_gaps"], row["duplicates_total"]) == (4, 0, 0)
    assert sorted(h["seq"] for h in row["history"]) == [1, 2, 3, 4]
    assert controller.call(controller.service.writer.call("ping")) != pid
    assert controller.metric("shopfleet_controller_store_errors_total", kind="writer") >= 1  # a dead writer is its own kind
    health = controller.service.health()
    assert (health["status"], health["store_failing_for_s"]) == ("ok", None)
    n.close()

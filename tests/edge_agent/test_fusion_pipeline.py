"""``type: fusion`` in a real agent, on real brokers: a scenario's tracks and board events in, carts out through the outbox.

The shop broker carries the inputs (as the shop's agents and the vision track stream publish
them); the agent's own uplink goes to a second broker that is down at first, as a shop's uplink
can be: carts must still be made, wait in the outbox, and arrive once when the uplink is back.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter

import pytest
import yaml

from edge_agent.agent import Agent
from edge_agent.config import validate_config
from edge_agent.mqtt_core import MqttSettings, ThreadedLink
from edge_agent.pipelines.fusion import Config, FusionPipeline, track_topic
from edge_agent.protocol import Alert, Event, Topics, encode, parse_message
from fleet_controller.broker_config import bridge_topics
from fusion.errors import LayoutInvalid
from fusion.generate import generate
from fusion.layout import parse_layout
from shopfleet.broker import BrokerProcess
from tests.support.fusion_replay import (
    SENSOR_NODE,
    SHOP,
    TRACK_NODE,
    VISION_NODE,
    bound,
    offline_carts,
    record_scenario,
    to_messages,
    with_publishers,
)
from tests.support.wait import wait_for


def test_the_track_topic_is_never_bridged():
    from paho.mqtt.client import topic_matches_sub

    from edge_agent.pipelines import fusion as pipeline_module
    from edge_agent.pipelines.floor import detection_topic
    from fleet_controller import broker_config

    acl = broker_config.render_shop_acl(SHOP, ["gpu-1"])
    # The ACL and the pipelines build their topics from one shape (protocol.Topics.local): the
    # topics a node publishes match its own write patterns and no other node's.
    writes = [line.split()[-1] for line in acl.splitlines() if line.startswith("topic write local/")]
    for topic in (pipeline_module.track_topic(SHOP, "gpu-1", "floor"), detection_topic(SHOP, "gpu-1", "cam-1")):
        assert [w for w in writes if topic_matches_sub(w, topic)], (topic, writes)
        assert not topic_matches_sub(f"local/v1/{SHOP}/tracks/gpu-2/+", topic)
        assert not any(topic_matches_sub(line.split()[1], topic) for line in broker_config.bridge_topics(SHOP, ["gpu-1"]))
    assert f"topic write local/v1/{SHOP}/tracks/gpu-1/+" in acl and f"topic read local/v1/{SHOP}/tracks/+/+" in acl
    assert f"topic read fleet/v1/{SHOP}/+/events" in acl and "readwrite" not in acl
    lines = bridge_topics(SHOP, ["gpu-1", "pi-1"])
    assert all(line.split()[1].startswith("fleet/v1/") for line in lines)
    assert not any(track_topic(SHOP, TRACK_NODE, "ceiling").startswith(line.split()[1].rstrip("#")) for line in lines)


@pytest.mark.timeout(120)
def test_carts_go_up_through_the_outbox_once_while_the_uplink_comes_and_goes(monkeypatch, tmp_path):
    result, inputs = record_scenario(monkeypatch, "crowd", seed=3)
    # What fusion makes of these inputs in time order, its carts closed by time passing (not by the end of a run).
    made, expected = offline_carts(result, inputs)
    layout = tmp_path / "layout.yaml"
    layout.write_text(yaml.safe_dump(with_publishers(result.scenario.shop).model_dump(mode="json")))
    (tmp_path / "shop-broker").mkdir()
    shop_broker = BrokerProcess(workdir=tmp_path / "shop-broker").start()
    # The uplink broker keeps the controller's persistent session across its own restart.
    (tmp_path / "uplink").mkdir()
    uplink = BrokerProcess(workdir=tmp_path / "uplink", engine="mosquitto").start()  # persistent, as configured by BrokerProcess
    received: list = []
    agent = publisher = listener = None
    try:
        listener = ThreadedLink(MqttSettings(host="127.0.0.1", port=uplink.port, client_id="controller"),
                                lambda m: received.append(parse_message(m.topic, m.payload)), clean=False,
                                subscriptions=Topics.controller_subscriptions)
        listener.start()
        listener.wait_connected(10)
        probe = Event(shop="probe", node="n", epoch="e", seq=1, type="probe")
        wait_for(lambda: listener.publish_nowait(Topics.node("probe", "n", "events"), encode(probe)) and
                 any(getattr(m, "type", "") == "probe" for m in received), 10, "the controller's subscription")
        uplink.stop()  # the shop's uplink goes down
        config = validate_config({
            "shop": SHOP, "node": "gpu-1", "broker": {"port": uplink.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "heartbeat_interval_s": 60, "outbox": {"path": str(tmp_path / "outbox.db")},
            "pipelines": [{"type": "fusion", "name": "fusion", "shop": SHOP, "layout": str(layout), "camera": "ceiling", "track_node": TRACK_NODE,
                           "broker": {"port": shop_broker.port}, "reorder_delay_s": 0.5, "gate_interval_s": 0.5}],
        }, source="test")
        agent = Agent(config)
        agent.start()
        pipeline = agent.supervisor.runners["fusion"].pipeline
        assert isinstance(pipeline, FusionPipeline)
        wait_for(lambda: "fusing" in pipeline.health()["detail"], 10, "the fusion pipeline to start")
        publisher = ThreadedLink(MqttSettings(host="127.0.0.1", port=shop_broker.port, client_id="shop-nodes"), lambda m: None)
        publisher.start()
        publisher.wait_connected(10)
        time.sleep(0.5)  # the pipeline subscribes right after its CONNACK; the broker keeps nothing for a later subscriber
        end = max(i.ts for i in inputs)
        messages = to_messages(inputs, base=time.time() - end - 5)  # the scenario just happened
        messages.insert(len(messages) // 2, next(m for m in messages if b"shelf_change" in m[1]))  # an outbox replay
        for topic, payload in messages:
            publisher.publish_nowait(topic, payload)
        n = len(made)
        wait_for(lambda: sum(pipeline._stats.values()) >= n, 30, f"{n} carts made with the uplink down")
        assert pipeline.health()["errors_by_reason"].get("duplicate") == 1
        assert agent.outbox.depth() >= n, "the carts wait in the outbox"
        uplink.start()  # the uplink is back: the outbox delivers
        wait_for(lambda: len([m for m in received if isinstance(m, Event) and m.type.startswith("cart_")]) >= n, 30, "the carts upstream")
        wait_for(lambda: agent.outbox.depth() == 0, 30, "the outbox to drain")
        time.sleep(0.5)  # a duplicate delivery would arrive now
    finally:
        for link in (publisher, listener):
            if link is not None:
                link.stop()
        if agent is not None:
            agent.stop(5.0)
        uplink.cleanup()
        shop_broker.cleanup()
    carts = [m for m in received if isinstance(m, Event) and m.type.startswith("cart_")]
    made_live = sum(pipeline._stats.values())
    assert len({c.data["cart_id"] for c in carts}) == len(carts) == made_live >= n, "each cart the pipeline made arrives exactly once"
    got = Counter(("accepted" if c.type == "cart_receipt" else "review", tuple(sorted((ln["product"], ln["quantity"]) for ln in c.data["lines"])))
                  for c in carts)
    # Live, fusion's clock runs on past the end of the scenario (a session lost inside closes after lost_exit_s), so
    # it may close a cart more than the offline run; every cart of the offline run is there, line for line.
    assert not expected - got, f"carts of the offline run missing live: {expected - got}"
    assert all(c.data["cart_id"].startswith(result.scenario.shop.name) for c in carts)


def test_bad_input_is_counted_not_fatal():
    p = bound(Config(type="fusion", name="f", shop=SHOP, layout="x.yaml", track_node=TRACK_NODE))
    assert p._decode(track_topic(SHOP, TRACK_NODE, "ceiling"), b"not json") == []
    assert p._decode(Topics.node(SHOP, "pi-1", "events"), b"{}") == []
    bad_change = Event(shop=SHOP, node="pi-1", epoch="e", seq=1, type="shelf_change", data={"board": "b"})
    assert p._decode(Topics.node(SHOP, "pi-1", "events"), encode(bad_change)) == []
    assert p.health()["errors_by_reason"] == {"bad_track_message": 1, "bad_event": 1, "bad_shelf_change": 1}


def test_tracks_are_taken_only_from_the_bound_node():
    """A track message under another node than track_node (another user's, the shop broker's ACL says) is counted and never fused."""
    p = FusionPipeline(Config(type="fusion", name="f", shop=SHOP, layout="x.yaml", camera="ceiling", track_node=TRACK_NODE))
    frame = json.dumps({"camera": "ceiling", "ts": 5.0, "tracks": [[7, 1.0, 2.0]], "ended": [3]}).encode()
    got = p._decode(track_topic(SHOP, TRACK_NODE, "ceiling"), frame)
    assert [(type(i).__name__, i.track_id, i.camera) for i in got] == [("TrackObservation", 7, "ceiling"), ("TrackLost", 3, "ceiling")]
    assert p._decode(track_topic(SHOP, "pi-1", "ceiling"), frame) == []  # a Pi's credentials, its own prefix
    assert p._decode(track_topic(SHOP, "pi-1", "ceiling"), frame) == []
    assert p._decode(track_topic(SHOP, TRACK_NODE, "ceiling"), frame.replace(b'"ceiling"', b'"floor"')) == []  # the body names another camera than its topic
    other = json.dumps({"camera": "other", "ts": 5.0, "tracks": [[1, 0, 0]]}).encode()
    assert p._decode(track_topic(SHOP, TRACK_NODE, "other"), other) == []  # not fusion's camera: ignored, whoever sends it
    assert p._decode(track_topic(SHOP, "pi-1", "other"), other) == []
    assert p.health()["errors_by_reason"] == {"track_wrong_node": 2, "track_camera_mismatch": 1}
    assert "read 1 track messages" in p.health()["detail"]


def test_a_flooding_publisher_fills_a_bounded_inbox_tracks_first():
    """Track messages past inbox_max are dropped and counted; events, which carts are made of, only past five times it."""
    p = FusionPipeline(Config(type="fusion", name="f", shop=SHOP, layout="x.yaml", track_node=TRACK_NODE, inbox_max=100))
    track = dataclasses.make_dataclass("Msg", ["topic", "payload"])
    for i in range(150):
        p._on_message(track(track_topic(SHOP, TRACK_NODE, "ceiling"), json.dumps({"camera": "ceiling", "ts": i, "tracks": []}).encode()))
    assert len(p._inbox) == 100 and p.health()["errors_by_reason"] == {"tracks_inbox_full": 50}
    event = encode(Event(shop=SHOP, node="pi-1", epoch="e", seq=1, type="door_opened", data={}))
    for _ in range(450):
        p._on_message(track(Topics.node(SHOP, "pi-1", "events"), event))
    assert len(p._inbox) == 500 and p.health()["errors_by_reason"] == {"tracks_inbox_full": 50, "inbox_full": 50}
    p._on_message(track(track_topic(SHOP, TRACK_NODE, "ceiling"), b"{}"))
    assert p.health()["errors_by_reason"]["tracks_inbox_full"] == 51
    p._inbox.clear()
    p._on_message(track(track_topic(SHOP, TRACK_NODE, "ceiling"), b"{}"))  # drained: taken again
    assert len(p._inbox) == 1
    assert "read 0 track messages, 0 events" in p.health()["detail"]


def test_events_are_taken_only_from_the_node_the_layout_binds_each_kind_to(caplog):
    """A shelf change, a door crossing or a door contact from another node (the topic's node: the shop ACL's publisher) is counted, never fused."""
    layout = generate("single", seed=1).shop
    slot = layout.slots[0]
    p = bound(Config(type="fusion", name="f", shop=SHOP, layout="x.yaml", camera="ceiling", track_node=TRACK_NODE), layout)
    seq = Counter()

    def decode(node: str, type_: str, data: dict, source: str = "x") -> list:
        seq[node] += 1
        msg = Event(shop=SHOP, node=node, epoch=f"ep-{node}", seq=seq[node], type=type_, source=source, data=data, at=100.0 + seq[node])
        return p._decode(Topics.node(SHOP, node, "events"), encode(msg))

    change = {"board": slot.board, "channel": slot.channel, "slot": slot.slot, "product": slot.product, "quantity": -1, "delta_g": -345.0, "confidence": 0.9}
    entered = {"camera": "ceiling", "track_id": 7, "zone": "door"}
    door = {"board": "door-1", "channel": 0}
    caplog.set_level("WARNING", logger="edge_agent.pipelines.fusion")
    # The attacker: a ceiling Pi's credentials, publishing on its own events topic (the only one the ACL lets it write).
    for _ in range(2):
        assert decode("cam-9", "shelf_change", change, slot.board) == []
        assert decode("cam-9", "person_entered", entered, "ceiling") == []
        assert decode("cam-9", "door_opened", door, "door-1") == []
    assert decode("cam-9", "zone_enter", entered, "ceiling") == []
    assert decode("cam-9", "shelf_change", {**change, "board": "no-such-board"}, "no-such-board") == []  # a board the layout lacks: board nodes only
    alert = Alert(shop=SHOP, node="cam-9", epoch="ep-a", seq=1, ts=1.0, name="sensor_board_disconnected", state="firing", source=slot.board)
    assert p._decode(Topics.node(SHOP, "cam-9", "events"), encode(alert)) == []  # blinding a board's slots
    # Right kind, wrong bound node: the camera's node may not send shelf changes, the sensor node no door crossings.
    assert decode(VISION_NODE, "shelf_change", change, slot.board) == []
    assert decode(SENSOR_NODE, "person_entered", entered, "ceiling") == []
    assert p.health()["errors_by_reason"] == {"event_wrong_node": 11}
    # Nothing of them is remembered: a flood of refused events cannot push the genuine ones out of the duplicate memory.
    assert not p._seen
    warned = [r.getMessage() for r in caplog.records if "event_wrong_node" in r.getMessage()]
    # Once per (node, kind) at warning level: cam-9 x 5 kinds, and the two bound nodes' one wrong kind each.
    assert len(warned) == 7, warned
    assert any(f"shelf_change of board '{slot.board}' from node 'cam-9', but publishers.boards[{slot.board}] is '{SENSOR_NODE}'" in w for w in warned), warned
    assert any(f"person_entered from node 'cam-9', but publishers.vision is '{VISION_NODE}'" in w for w in warned), warned
    # The bound nodes' events still fuse, and the genuine ones are not mistaken for duplicates of the refused.
    got = decode(SENSOR_NODE, "shelf_change", change, slot.board)
    assert [(type(i).__name__, i.board, i.quantity) for i in got] == [("ShelfChange", slot.board, -1)]
    replay = Event(shop=SHOP, node=SENSOR_NODE, epoch=f"ep-{SENSOR_NODE}", seq=seq[SENSOR_NODE], type="shelf_change", source=slot.board, data=change)
    assert p._decode(Topics.node(SHOP, SENSOR_NODE, "events"), encode(replay)) == []  # its outbox replay: fed once
    assert [type(i).__name__ for i in decode(VISION_NODE, "person_entered", entered, "ceiling")] == ["DoorCrossing"]
    assert [type(i).__name__ for i in decode(VISION_NODE, "zone_enter", entered, "ceiling")] == ["ZoneVisit"]
    assert [(type(i).__name__, i.open) for i in decode(SENSOR_NODE, "door_opened", door, "door-1")] == [("DoorContact", True)]
    assert [type(i).__name__ for i in decode(SENSOR_NODE, "shelf_change", {**change, "board": "no-such-board"})] == ["ShelfChange"]
    ok = Alert(shop=SHOP, node=SENSOR_NODE, epoch="ep-a", seq=1, ts=1.0, name="sensor_board_disconnected", state="firing", source=slot.board)
    assert [type(i).__name__ for i in p._decode(Topics.node(SHOP, SENSOR_NODE, "events"), encode(ok))] == ["BoardLink"]
    # Another camera's vision events are not fusion's input, from whoever: ignored, not counted.
    assert decode("cam-9", "person_entered", {**entered, "camera": "other"}, "other") == []
    assert p.health()["errors_by_reason"] == {"event_wrong_node": 11, "duplicate": 1}


def test_the_event_binding_is_required_and_checked_against_the_layout(tmp_path):
    """No publishers: the pipeline does not start (never 'every node'); an unknown or unbound board, or an empty binding, is named at load."""
    layout = generate("single", seed=1).shop
    data = layout.model_dump(mode="json", exclude={"publishers"})
    boards = sorted({s.board for s in layout.slots})
    path = tmp_path / "layout.yaml"
    path.write_text(yaml.safe_dump(data))
    p = FusionPipeline(Config(type="fusion", name="f", shop=SHOP, layout=str(path), track_node=TRACK_NODE, restart_budget=0))
    with pytest.raises(RuntimeError, match=r"pipelines\[f\]: layout .*layout.yaml has no publishers: fusion takes each kind of event only from"):
        p.run(threading.Event(), None)  # type: ignore[arg-type]

    def error(publishers: object) -> str:
        with pytest.raises(LayoutInvalid) as exc:
            parse_layout({**data, "publishers": publishers}, source="shop.yaml")
        return str(exc.value)

    full = {"vision": "gpu-1-vision", "door": "pi-1-sensors", "boards": dict.fromkeys(boards, "pi-1-sensors")}
    assert parse_layout({**data, "publishers": full}).publishers.boards == full["boards"]
    assert f"publishers.boards names boards no slot is on: ['door-9'] (the slots' boards: {boards})" in error({**full, "boards": {**full["boards"], "door-9": "pi-1"}})
    assert f"publishers.boards has no node for boards {{'{boards[0]}': " in error({**full, "boards": {b: "pi-1" for b in boards[1:]} or {"x": "y"}})
    assert "publishers.boards: Dictionary should have at least 1 item" in error({**full, "boards": {}})
    assert "publishers.vision: Field required" in error({"door": "pi-1", "boards": full["boards"]})
    assert "publishers.door: String should match pattern" in error({**full, "door": "Pi 1"})
    assert f"boards: the nodes of {{'{boards[0]}': 'Pi 1'}} (board: node) are not node ids" in error({**full, "boards": {**full["boards"], boards[0]: "Pi 1"}})

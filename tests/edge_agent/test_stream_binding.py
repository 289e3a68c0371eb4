"""Shop-local streams are bound to the identity that publishes them, on the shop broker as ``broker-config --shop-broker`` writes it.

The attack: one node's credentials (a Raspberry Pi's, ``<shop>.pi-1``) publish false positions for a
camera, or for the floor's merged tracks, so that fusion charges a pick to the wrong shopper. Two
defences, both shown here against the real Mosquitto with the password file and ACL that
``write_broker_config(..., shop_brokers=...)`` writes, and the real ``type: floor`` and ``type:
fusion`` pipelines:

* the broker: a stream's topic carries its publisher's node
  (``local/v1/{shop}/detections/{node}/{camera}``, ``.../tracks/{node}/{stream}``) and each node
  user may write only under its own node, so pi-1's publish under the camera's or the floor's
  prefix is refused (PUBACK "not authorized" under MQTT 5) and delivered to no one;
* the consumers: under its own prefix pi-1 may publish, but the floor pipeline takes camera
  ``cam-1`` only from the node its ``cameras[].node`` names and fusion takes tracks only from its
  ``track_node``: pi-1's messages are counted (``wrong_node``, ``track_wrong_node``) and never
  tracked or fused.

Events too (the second test): a node writes only its own ``fleet/v1/{shop}/{node}/events``, and
fusion takes each kind of event only from the node its layout's ``publishers`` names, so pi-1's
false ``shelf_change`` (a second unit of what a shopper took, which would be charged),
``person_entered`` and ``door_opened`` on its own topic are counted (``event_wrong_node``) and the
carts are those of the genuine events alone.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
import uuid
from collections import Counter
from typing import Any

import paho.mqtt.client as paho
import pytest
import yaml

from edge_agent.mqtt_core import MqttSettings, ThreadedLink
from edge_agent.pipelines import build_pipeline
from edge_agent.pipelines.floor import Config as FloorConfig
from edge_agent.pipelines.floor import detection_subscription, detection_topic
from edge_agent.pipelines.fusion import Config as FusionConfig
from edge_agent.pipelines.fusion import track_subscription, track_topic
from edge_agent.protocol import Event, Topics, encode
from edge_agent.supervisor import PipelineRunner
from fleet_controller.broker_config import BrokerOptions, write_broker_config
from fleet_controller.pki import Pki
from fusion.types import DoorContact, DoorCrossing, ShelfChange
from shopfleet.broker import BrokerProcess
from tests.support.fusion_replay import offline_carts, record_scenario, to_messages, with_publishers
from tests.support.sink import RecordingSink
from tests.support.vision import plaza_floor_files
from tests.support.wait import wait_for
from vision.multiview import FloorDetections, encode_frame

SHOP = "shop-s"
CAM, CAM_NODE = "cam-1", "cam-1-detections"  # the camera and the node part of the user its detections: stream publishes as
FLOOR_NODE, FUSION_NODE, ATTACKER, OBSERVER = "gpu-1-floor", "fusion-inputs", "pi-1", "observer"
FORGED = 4242  # the track id and frame seq the attacker's messages carry, so they are told apart wherever they land
NOT_AUTHORIZED = 135  # MQTT 5 reason code of a PUBACK for a publish the broker's ACL refuses


class Shop:
    """The shop broker as written by broker-config, and a client per node user."""

    def __init__(self, tmp_path, nodes: tuple[str, ...] = (ATTACKER, CAM_NODE, FLOOR_NODE, FUSION_NODE, OBSERVER)) -> None:
        Pki.init(tmp_path / "pki")
        opts = BrokerOptions(pki_dir=tmp_path / "pki", persistence_dir=tmp_path / "persist", shop_brokers=(SHOP,), central="mqtt.example")
        files = write_broker_config([(SHOP, n) for n in nodes], tmp_path / "out", options=opts)
        self.creds = json.loads(files.credentials_file.read_text())["nodes"]
        d = files.shop_dirs[SHOP]
        (tmp_path / "broker").mkdir()
        self.broker = BrokerProcess(workdir=tmp_path / "broker", engine="mosquitto", password_file=d / "passwd", acl_file=d / "acl").start()

    def login(self, node: str) -> tuple[str, str]:
        c = self.creds[f"{SHOP}/{node}"]
        return c["username"], c["password"]

    def broker_keys(self, node: str) -> dict:
        user, password = self.login(node)
        return {"port": self.broker.port, "username": user, "password": password, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}

    def link(self, node: str, on_message=lambda m: None, subscriptions: tuple[str, ...] = ()) -> ThreadedLink:
        user, password = self.login(node)
        link = ThreadedLink(MqttSettings(host="127.0.0.1", port=self.broker.port, client_id=f"t-{uuid.uuid4().hex[:8]}", username=user, password=password),
                            on_message, subscriptions=subscriptions)
        link.start()
        link.wait_connected(10)
        return link


class Attacker:
    """pi-1's stolen credentials on MQTT 5, so the broker's verdict on each publish is seen in its PUBACK."""

    def __init__(self, shop: Shop) -> None:
        self.acks: queue.Queue[tuple[int, int]] = queue.Queue()
        self.connected: list = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
        self.c.username_pw_set(*shop.login(ATTACKER))
        self.c.on_connect = lambda c, u, f, rc, p: self.connected.append(rc)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc.value))
        self.c.connect("127.0.0.1", shop.broker.port)
        self.c.loop_start()
        wait_for(lambda: self.connected, 10, "the attacker's CONNACK")
        assert not self.connected[0].is_failure, "a node's own credentials log in"

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 and return the PUBACK's reason code (0: accepted)."""
        info = self.c.publish(topic, payload, qos=1)
        mid, rc = self.acks.get(timeout=10)
        assert mid == info.mid
        return rc

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _person(x: float, y: float) -> FloorDetections:
    import numpy as np

    xy = np.array([[x, y]])
    return FloorDetections(xy, np.c_[xy - 0.2, xy + 0.2], np.array([0.95]))


@pytest.mark.timeout(90)
def test_one_nodes_credentials_can_neither_publish_another_nodes_stream_nor_feed_the_floor_or_fusion(tmp_path) -> None:
    shop = Shop(tmp_path)
    top, layout = plaza_floor_files(tmp_path, {"vision": "gpu-1-fusion", "door": "pi-2-sensors", "boards": {"b1": "pi-2-sensors"}})
    floor_cfg = FloorConfig.model_validate({
        "type": "floor", "name": "floor", "shop": SHOP, "broker": shop.broker_keys(FLOOR_NODE), "zones": str(top), "restart_budget": 0,
        "cameras": [{"camera": CAM, "node": CAM_NODE, "coverage": [[0, 0], [8, 0], [8, 6], [0, 6]]}],
        "merge": {"px_per_m": 100, "origin_m": [0, 0]}, "latency_s": 0.2, "gate_interval_s": 0.5})
    fusion_cfg = FusionConfig.model_validate({
        "type": "fusion", "name": "fusion", "shop": SHOP, "broker": shop.broker_keys(FUSION_NODE), "layout": str(layout), "restart_budget": 0,
        "camera": "floor", "track_node": FLOOR_NODE, "reorder_delay_s": 0.2})
    seen: list[tuple[str, bytes]] = []
    floor = fusion = camera = observer = attacker = None
    try:
        floor = PipelineRunner(build_pipeline(floor_cfg), floor_cfg, RecordingSink())
        fusion = PipelineRunner(build_pipeline(fusion_cfg), fusion_cfg, RecordingSink())
        floor.start()
        fusion.start()
        # Another node user of the shop, reading every stream: what the broker delivered, to anyone.
        observer = shop.link(OBSERVER, lambda m: seen.append((m.topic, m.payload)), (detection_subscription(SHOP), track_subscription(SHOP)))
        camera = shop.link(CAM_NODE)
        fp, fu = floor.pipeline, fusion.pipeline
        seq = [0]

        def frame() -> bool:
            """The camera publishes one genuine frame (a person at the shelf) on its own prefix."""
            seq[0] += 1
            camera.publish_nowait(detection_topic(SHOP, CAM_NODE, CAM), encode_frame(CAM, time.time(), seq[0], _person(4.5, 2.6)), qos=0)
            return True

        # The genuine path works on the written ACL: the camera's frames reach the floor, the floor's tracks reach fusion.
        wait_for(lambda: frame() and fp.stats["frames_accepted"] >= 5 and "read 0 track messages" not in fu.health()["detail"]
                 and any(t == track_topic(SHOP, FLOOR_NODE, "floor") for t, _ in seen), 30, "camera -> floor -> fusion over the shop broker")
        assert fp.health()["errors_by_reason"] == {} and fu.health()["errors_by_reason"] == {}

        attacker = Attacker(shop)
        forged_frame = encode_frame(CAM, time.time(), FORGED, _person(1.0, 1.0))
        forged_tracks = json.dumps({"camera": "floor", "ts": round(time.time(), 3), "tracks": [[FORGED, 1.0, 1.0]], "ended": []}).encode()
        # 1) Under another node's prefix: the camera's and the floor's. The broker refuses both.
        assert attacker.publish(detection_topic(SHOP, CAM_NODE, CAM), forged_frame) == NOT_AUTHORIZED
        assert attacker.publish(track_topic(SHOP, FLOOR_NODE, "floor"), forged_tracks) == NOT_AUTHORIZED
        assert attacker.publish(detection_topic(SHOP, "nobody", CAM), forged_frame) == NOT_AUTHORIZED  # a node without a user either
        assert attacker.publish(f"local/v1/{SHOP}/tracks/floor", forged_tracks) == NOT_AUTHORIZED  # the old, unbound topic shape
        # 2) Under its own prefix, the only place it may write: accepted by the broker, refused by the consumers.
        assert attacker.publish(detection_topic(SHOP, ATTACKER, CAM), forged_frame) == 0
        assert attacker.publish(track_topic(SHOP, ATTACKER, "floor"), forged_tracks) == 0
        # One client's messages reach a subscriber in order: once the own-prefix ones arrived, a refused one delivered
        # to anyone would have arrived before them.
        wait_for(lambda: {detection_topic(SHOP, ATTACKER, CAM), track_topic(SHOP, ATTACKER, "floor")} <= {t for t, _ in seen}, 10,
                 "the attacker's own-prefix messages at the observer")
        wait_for(lambda: fp.health()["errors_by_reason"].get("wrong_node") == 1, 10, "the floor to drop the camera's frame from pi-1")
        wait_for(lambda: fu.health()["errors_by_reason"].get("track_wrong_node") == 1, 10, "fusion to drop the floor tracks from pi-1")
        forged = [t for t, p in seen if p in (forged_frame, forged_tracks)]
        assert sorted(forged) == sorted([detection_topic(SHOP, ATTACKER, CAM), track_topic(SHOP, ATTACKER, "floor")]), "nothing under another prefix was delivered"
        accepted = fp.stats["frames_accepted"]
        wait_for(lambda: frame() and fp.stats["frames_accepted"] >= accepted + 3, 10, "the genuine camera's frames to go on being tracked")
        floor_errors, fusion_errors = fp.health()["errors_by_reason"], fu.health()["errors_by_reason"]
    finally:
        for closer in (attacker, camera, observer):
            if closer is not None:
                (closer.close if isinstance(closer, Attacker) else closer.stop)()
        for runner in (floor, fusion):
            if runner is not None:
                runner.stop()
        shop.broker.cleanup()
    assert floor_errors == {"wrong_node": 1} and fusion_errors == {"track_wrong_node": 1}, (floor_errors, fusion_errors)
    assert fp._registry.get_sample_value("shopfleet_floor_frames_dropped_total", {"camera": CAM, "reason": "wrong_node"}) == 1
    # The forged person (at 1, 1) never became a track: every track the floor published is the genuine one at the shelf.
    floor_tracks = [json.loads(p) for t, p in seen if t == track_topic(SHOP, FLOOR_NODE, "floor")]
    positions = [(x, y) for body in floor_tracks for _, x, y in body["tracks"]]
    assert positions and all(abs(x - 4.5) < 0.5 and abs(y - 2.6) < 0.5 for x, y in positions), positions[:5]


TRACK_STREAM, VISION_NODE, SENSOR_NODE = "track-stream", "gpu-1-vision", "pi-2-sensors"  # the bound publishers, as deployed


def _forged(inputs: list) -> list:
    """What pi-1 forges at the scenario's own moments: a second unit of the first pick, a door opening and an entry."""
    change = next(i for i in inputs if isinstance(i, ShelfChange))
    return [dataclasses.replace(change, id="forged", ts=change.ts + 0.05), DoorContact(change.ts + 2.5, True, "door"),
            DoorCrossing(FORGED, change.ts + 3.0, "in")]


@pytest.mark.timeout(120)
def test_one_nodes_credentials_cannot_feed_fusion_events_of_another_kind_or_board(monkeypatch, tmp_path) -> None:
    result, inputs = record_scenario(monkeypatch, "single", seed=1)
    forged = _forged(inputs)
    _, expected = offline_carts(result, inputs)
    _, if_fused = offline_carts(result, inputs + forged)
    assert expected - if_fused, "fused, pi-1's events would change a cart (a unit more charged): the test could fail"
    shop = Shop(tmp_path, (TRACK_STREAM, VISION_NODE, SENSOR_NODE, FUSION_NODE, ATTACKER))
    layout = tmp_path / "layout.yaml"
    layout.write_text(yaml.safe_dump(with_publishers(result.scenario.shop, VISION_NODE, SENSOR_NODE).model_dump(mode="json")))
    cfg = FusionConfig.model_validate({
        "type": "fusion", "name": "fusion", "shop": SHOP, "broker": shop.broker_keys(FUSION_NODE), "layout": str(layout), "restart_budget": 0,
        "camera": "ceiling", "track_node": TRACK_STREAM, "reorder_delay_s": 1.0})
    sink = RecordingSink()
    runner = attacker = None
    links: dict[str, ThreadedLink] = {}
    try:
        runner = PipelineRunner(build_pipeline(cfg), cfg, sink)
        runner.start()
        fu = runner.pipeline
        links = {n: shop.link(n) for n in (TRACK_STREAM, VISION_NODE, SENSOR_NODE)}
        probe = iter(range(1, 1000))
        wait_for(lambda: links[SENSOR_NODE].publish_nowait(Topics.node(SHOP, SENSOR_NODE, "events"), encode(Event(
            shop=SHOP, node=SENSOR_NODE, epoch="probe", seq=next(probe), type="probe"))) and "read 0 track messages, 0 events" not in fu.health()["detail"],
            20, "fusion's subscription to the shop's events")
        attacker = Attacker(shop)
        base = time.time() - max(i.ts for i in inputs) - 5  # the scenario just happened
        fakes = to_messages(forged, base, SHOP, TRACK_STREAM, ATTACKER, ATTACKER)
        assert [t for t, _ in fakes] == [Topics.node(SHOP, ATTACKER, "events")] * 3
        # Under the sensor node's topic, the board's own: the broker refuses it (and every node's but one's own).
        posing = [(Topics.node(SHOP, SENSOR_NODE, "events"), p.replace(f'"{ATTACKER}"'.encode(), f'"{SENSOR_NODE}"'.encode())) for _, p in fakes]
        assert all(attacker.publish(t, p) == NOT_AUTHORIZED for t, p in posing)
        assert attacker.publish(Topics.node(SHOP, VISION_NODE, "events"), posing[2][1]) == NOT_AUTHORIZED
        # The shop as it happened, each message from its own publisher, in order (one publisher's message is at the
        # broker before the next publisher's is sent); pi-1's forgeries on its own topic, amid them.
        last: tuple[str, Any] | None = None
        for topic, payload in to_messages(inputs, base, SHOP, TRACK_STREAM, VISION_NODE, SENSOR_NODE):
            node = topic.split("/")[4 if topic.startswith("local/") else 3]
            if last is not None and last[0] != node:
                last[1].wait_for_publish(10)
            last = (node, links[node].publish_nowait(topic, payload, qos=1))
            if fakes and json.loads(fakes[0][1])["at"] <= json.loads(payload).get("at", json.loads(payload).get("ts")):
                assert attacker.publish(*fakes.pop(0)) == 0, "its own events topic: the broker lets it write there"
        assert not fakes
        n = sum(expected.values())
        wait_for(lambda: len([e for e in sink.events if e[0].startswith("cart_")]) >= n, 60, f"{n} carts")
        got = Counter(("accepted" if t == "cart_receipt" else "review", tuple(sorted((ln["product"], ln["quantity"]) for ln in d["lines"])))
                      for t, _, d in sink.events if t.startswith("cart_"))
        assert not expected - got, f"the genuine carts, as fusion makes them offline: missing {expected - got}, got {got}"
        assert not (if_fused - expected) & got, "no cart charged pi-1's forged pick"
        wait_for(lambda: fu.health()["errors_by_reason"].get("event_wrong_node") == 3, 10, "fusion to count pi-1's three events")
        errors = fu.health()["errors_by_reason"]
    finally:
        if attacker is not None:
            attacker.close()
        for link in links.values():
            link.stop()
        if runner is not None:
            runner.stop()
        shop.broker.cleanup()
    assert {r: c for r, c in errors.items() if not r.startswith("fusion_")} == {"event_wrong_node": 3}, errors

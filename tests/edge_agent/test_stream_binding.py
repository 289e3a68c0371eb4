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
"""

from __future__ import annotations

import json
import queue
import time
import uuid

import paho.mqtt.client as paho
import pytest
import yaml

from edge_agent.mqtt_core import MqttSettings, ThreadedLink
from edge_agent.pipelines import build_pipeline
from edge_agent.pipelines.floor import Config as FloorConfig
from edge_agent.pipelines.floor import detection_subscription, detection_topic
from edge_agent.pipelines.fusion import Config as FusionConfig
from edge_agent.pipelines.fusion import track_subscription, track_topic
from edge_agent.supervisor import PipelineRunner
from fleet_controller.broker_config import BrokerOptions, write_broker_config
from fleet_controller.pki import Pki
from shopfleet.broker import BrokerProcess
from tests.support.sink import RecordingSink
from tests.support.vision import PLAZA_ZONES
from tests.support.wait import wait_for
from vision.multiview import FloorDetections, encode_frame

SHOP = "shop-s"
CAM, CAM_NODE = "cam-1", "cam-1-detections"  # the camera and the node part of the user its detections: stream publishes as
FLOOR_NODE, FUSION_NODE, ATTACKER, OBSERVER = "gpu-1-floor", "fusion-inputs", "pi-1", "observer"
FORGED = 4242  # the track id and frame seq the attacker's messages carry, so they are told apart wherever they land
NOT_AUTHORIZED = 135  # MQTT 5 reason code of a PUBACK for a publish the broker's ACL refuses


class Shop:
    """The shop broker as written by broker-config, and a client per node user."""

    def __init__(self, tmp_path) -> None:
        Pki.init(tmp_path / "pki")
        opts = BrokerOptions(pki_dir=tmp_path / "pki", persistence_dir=tmp_path / "persist", shop_brokers=(SHOP,), central="mqtt.example")
        files = write_broker_config([(SHOP, n) for n in (ATTACKER, CAM_NODE, FLOOR_NODE, FUSION_NODE, OBSERVER)], tmp_path / "out", options=opts)
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
    top = tmp_path / "zones-floor.yaml"
    top.write_text(yaml.safe_dump({**PLAZA_ZONES, "camera": "floor", "anchor": "center"}))
    layout = tmp_path / "layout.yaml"
    layout.write_text(yaml.safe_dump({
        "name": "plaza", "width_m": 8, "depth_m": 6, "door": {"a": [6.5, 2.5], "b": [6.5, 5.2], "inside": [5.0, 3.5]},
        "slots": [{"slot": "A1", "shelf": "shelf-1", "board": "b1", "channel": 0, "product": "cola", "unit_weight_g": 345, "price_cents": 150,
                   "front": [4.5, 2.0], "facing": [0, 1]}],
    }))
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

"""The multi-camera path as deployed: one ``shopfleet agent`` process, two cameras, the floor tracker and fusion.

One agent config runs two ``type: vision`` pipelines with ``detections:`` (two ceiling cameras,
HTTP MJPEG streams of the fixture clip vtest.avi on one clock; the second camera is mounted the
other way round, its image mirrored, so its homography differs but maps every person to the same
floor point), a ``type: floor`` pipeline merging them, and a ``type: fusion`` pipeline reading
the floor's tracks (``tracks/gpu-1-floor/floor``: each stream under its publisher's node, and each
consumer bound to that node). The shop broker is Mosquitto with the password file and ACL that
``shopfleet broker-config --shop-broker`` writes, each pipeline connection a user of its own; the
agent's uplink is that same broker (as in a shop: its bridge forwards ``fleet/v1`` to the central
broker), read here by a user standing in for the bridge.
"""

from __future__ import annotations

import json
import statistics

import cv2
import pytest
import yaml

from edge_agent.pipelines.floor import detection_topic
from edge_agent.pipelines.fusion import track_topic
from shopfleet.broker import free_port
from tests.support.shop_e2e import (
    FUSION_DETAIL,
    AgentProc,
    Controller,
    Listener,
    MjpegServer,
    SecuredShopBroker,
    floor_detail,
    publish_event,
)
from tests.support.vision import PLAZA_ZONES, plaza_floor_files
from tests.support.wait import wait_for
from vision.fixtures import fetch_fixture
from vision.model import cache_root, fetch_model
from vision.multiview import decode_frame

pytestmark = pytest.mark.slow

SHOP, NODE = "shop-e", "gpu-1"
FPS = 5.0  # the cameras' frame rate: the detector (~130 ms a frame on one core) keeps up with two of them on two cores
FRAMES = 60  # 12 s of the streams (6 s of vtest.avi, shown at half speed): people walk in from the right and cross the door
W, H = 768, 576
PIPELINES = {"cam-a", "cam-b", "floor", "fusion"}
FLOOR_TRACKS = track_topic(SHOP, f"{NODE}-floor", "floor")  # under the floor pipeline's own user, the node fusion's track_node names
CAM_A = detection_topic(SHOP, "cam-a-detections", "cam-a")  # under camera a's detections: user, the node the floor's cameras[].node names


@pytest.fixture(scope="module")
def media() -> dict:
    """The model package and the JPEG frames of both cameras (nothing is downloaded: vision/fixtures.py, the model cache)."""
    cache = cache_root()
    pkg = fetch_model("yolov4-tiny", cache)
    src = cv2.VideoCapture(str(fetch_fixture("vtest.avi", cache / "fixtures", cache)))
    a, b = [], []
    for _ in range(FRAMES):
        ok, img = src.read()
        assert ok
        a.append(cv2.imencode(".jpg", img)[1].tobytes())
        b.append(cv2.imencode(".jpg", cv2.flip(img, 1))[1].tobytes())  # camera b hangs the other way round
    src.release()
    return {"model": str(pkg.path), "cam-a": a, "cam-b": b}


def _mirror(zones: dict, camera: str) -> dict:
    """The plaza zones as camera b sees them (its image mirrored left-right)."""
    door = zones["door"]
    return {"camera": camera,
            "door": {"a": [W - door["a"][0], door["a"][1]], "b": [W - door["b"][0], door["b"][1]], "enter_from": "right"},
            "shelves": [{**s, "polygon": [[W - x, y] for x, y in s["polygon"]]} for s in zones["shelves"]]}


def _config(tmp_path, shop: SecuredShopBroker, cams: MjpegServer, model: str, metrics_port: int) -> dict:
    # The floor: camera a's image at 1 cm a pixel, (0, 0) at the floor's origin. Camera a gives its homography as a
    # matrix, camera b (mirrored) as four floor marks: the same pixel column x of a is column W - x of b.
    floor = [[0.0, 0.0], [W / 100, 0.0], [W / 100, H / 100], [0.0, H / 100]]
    streams = {
        "cam-a": {"homography": [[0.01, 0, 0], [0, 0.01, 0], [0, 0, 1]]},
        "cam-b": {"image_px": [[W, 0], [0, 0], [0, H], [W, H]], "floor_m": floor},
    }
    vision = []
    for cam, calib in streams.items():
        zones = tmp_path / f"zones-{cam}.yaml"
        zones.write_text(yaml.safe_dump({**PLAZA_ZONES, "camera": cam} if cam == "cam-a" else _mirror(PLAZA_ZONES, cam)))
        vision.append({"type": "vision", "name": cam, "camera": cam, "source": cams.url(cam), "model": model, "zones": str(zones), "threads": 1,
                       "reconnect_initial_s": 0.2, "reconnect_max_s": 1.0, "gate_interval_s": 1.0,
                       "detections": {"shop": SHOP, "broker": shop.creds(f"{cam}-detections"), "anchor": "center", "image_size": [W, H], **calib}})
    # Fusion's events: the floor's door crossings from this agent, the door contact and the board from the sensor node pi-1.
    top, layout = plaza_floor_files(tmp_path, {"vision": NODE, "door": "pi-1", "boards": {"b1": "pi-1"}})
    return {
        "shop": SHOP, "node": NODE, "node_class": "gpu",
        "broker": shop.creds(NODE, reconnect_min_s=0.2, reconnect_max_s=1.0),
        "heartbeat_interval_s": 1.0, "outbox": {"path": str(tmp_path / "outbox.db")}, "shutdown_timeout_s": 5,
        "metrics": {"port": metrics_port},
        "pipelines": [
            *vision,
            {"type": "floor", "name": "floor", "shop": SHOP, "broker": shop.creds(f"{NODE}-floor"), "zones": str(top),
             "cameras": [{"camera": c, "node": f"{c}-detections", "coverage": floor} for c in streams], "merge": {"px_per_m": 100, "origin_m": [0, 0], "gate_m": 0.5},
             "tick_hz": FPS, "dark_after_s": 2.0, "gate_interval_s": 0.5},
            {"type": "fusion", "name": "fusion", "shop": SHOP, "broker": shop.creds(f"{NODE}-fusion"), "layout": str(layout), "camera": "floor",
             "track_node": f"{NODE}-floor", "reorder_delay_s": 0.5, "gate_interval_s": 1.0},
        ],
    }


def _sample(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lbl), v in samples.items() if n == name and all(dict(lbl).get(k) == want for k, want in labels.items()))


@pytest.mark.timeout(150)
def test_two_cameras_floor_and_fusion_in_one_agent_on_the_secured_shop_broker(media, tmp_path) -> None:
    users = [NODE, f"{NODE}-floor", f"{NODE}-fusion", "cam-a-detections", "cam-b-detections", "pi-1", "observer"]
    shop = SecuredShopBroker(tmp_path / "broker", SHOP, users)
    cams = MjpegServer({"cam-a": media["cam-a"], "cam-b": media["cam-b"]}, FPS)
    controller = agent = observer = None
    try:
        controller = Controller(shop)
        # A node user of the shop on the shop-local topics: the floor's tracks and camera a's detections.
        observer = Listener(shop, "observer", (FLOOR_TRACKS, CAM_A))
        agent = AgentProc(tmp_path, _config(tmp_path, shop, cams, media["model"], free_port()))
        agent.start()

        def last_beat():
            assert agent.alive(), agent.tail()
            beats = controller.heartbeats(NODE)
            return beats[-1] if beats else None

        def all_running():
            hb = last_beat()
            return hb is not None and set(hb.pipelines) == PIPELINES and all(p.state == "running" for p in hb.pipelines.values()) and hb

        wait_for(all_running, 60, "a heartbeat with every pipeline running")
        publish_event(shop, "pi-1", 1, "door_opened", "door-1", {"board": "door-1"})

        # The door contact (a sensor node's event on the shop broker): fusion opens a session only for a door
        # crossing while the door is open. Sent again until fusion shows a shopper (it may not have subscribed yet).
        seq = [1]

        def door_open_and_shopper_inside():
            hb = last_beat()
            m = FUSION_DETAIL.search(hb.pipelines["fusion"].detail) if hb else None
            if m and int(m[1]) >= 1:
                return hb
            seq[0] += 1
            publish_event(shop, "pi-1", seq[0], "door_opened", "door-1", {"board": "door-1"})
            return None

        # 1) The floor pipeline tracks people from both cameras: its heartbeat health says so and its gate metrics too.
        def both_live_and_tracking():
            hb = last_beat()
            d = floor_detail(hb.pipelines["floor"].detail) if hb else None
            return d is not None and d[0] == d[1] == 2 and d[2] >= 10 and hb.metrics.get("floor_cameras_live_ratio") == 1.0 \
                and hb.metrics.get("floor_tick_rate", 0) > 0 and hb

        hb = wait_for(both_live_and_tracking, 30, "the floor pipeline tracking with both cameras live")
        assert hb.pipelines["floor"].fps > 0
        s = agent.scrape()
        assert _sample(s, "shopfleet_floor_frames_total", camera="cam-a") > 0 and _sample(s, "shopfleet_floor_frames_total", camera="cam-b") > 0

        # 2) The floor's door crossings go through the agent's outbox to the uplink, as floor events (not the cameras').
        entered = wait_for(lambda: controller.events("person_entered", "floor"), 40, "person_entered of the floor pipeline upstream")
        assert entered[0].data["camera"] == "floor" and entered[0].data["zone"] == "door" and entered[0].node == NODE
        wait_for(lambda: controller.events("zone_enter", "floor"), 20, "zone_enter of the floor pipeline upstream")

        # 3) Fusion consumed tracks/floor and the floor's door crossings: a session opens only for a crossing by a
        # track fusion has seen positions of (else 'crossing-unknown-track'), with the door contact open.
        wait_for(door_open_and_shopper_inside, 40, "fusion to open a session from the floor's tracks and door crossing", interval=0.5)
        wait_for(all_running, 10, "every pipeline still running")
        bad = {r: v for (n, lbl), v in agent.scrape().items() if n == "shopfleet_agent_pipeline_errors_total" and dict(lbl)["pipeline"] == "fusion"
               for r in [dict(lbl)["reason"]] if v and r in ("bad_track_message", "bad_event", "fusion_crossing-unknown-track")}
        assert not bad, f"fusion could not use what the floor pipeline sent: {bad}"

        # Both views of a person merge into one floor track: the floor has about as many tracks as camera a sees
        # people (were camera b's homography wrong, its people would land elsewhere and every person be two tracks).
        seen: list[tuple[str, bytes]] = []

        def enough() -> bool:
            seen.extend(observer.take())
            return sum(t == FLOOR_TRACKS for t, _ in seen) >= 30 and sum(t == CAM_A for t, _ in seen) >= 30

        wait_for(enough, 30, "30 floor track messages and 30 frames of camera a")
        tracks = [len(json.loads(p)["tracks"]) for t, p in seen if t == FLOOR_TRACKS]
        people = [len(decode_frame(p).detections) for t, p in seen if t == CAM_A]
        assert 1 <= statistics.median(tracks) <= statistics.median(people) + 1, (statistics.median(tracks), statistics.median(people))

        # 4) Camera b dies: the floor pipeline reports it not live, and goes on tracking from camera a alone.
        before = floor_detail(last_beat().pipelines["floor"].detail)
        assert before is not None
        cams.kill("cam-b")

        def one_live():
            hb = last_beat()
            d = floor_detail(hb.pipelines["floor"].detail)
            return d is not None and d[0] == 1 and hb.metrics.get("floor_cameras_live_ratio") == 0.5 and (d, hb)

        dark, _ = wait_for(one_live, 20, "camera b reported not live")
        b_frames = _sample(agent.scrape(), "shopfleet_floor_frames_total", camera="cam-b")
        wait_for(lambda: (d := floor_detail(last_beat().pipelines["floor"].detail)) is not None and d[2] >= dark[2] + 10, 20,
                 "ticks tracked from camera a alone")
        s = agent.scrape()
        assert _sample(s, "shopfleet_floor_frames_total", camera="cam-b") == b_frames, "no frame of the dead camera"
        assert _sample(s, "shopfleet_floor_tick_cameras") == 1
        assert last_beat().metrics["floor_cameras_live_ratio"] == 0.5
        assert last_beat().pipelines["cam-b"].state == "running"  # a live camera reconnects with backoff; it does not fail
        assert not controller.rejected, controller.rejected[:3]
        # Both views of a person merged into one floor track: were the mirrored camera's homography wrong, every
        # person would be two tracks and cross the door twice. (+1: a camera's last crossing may be upstream before the floor's.)
        entries = {src: len({e.data["track_id"] for e in controller.events("person_entered", src)}) for src in ("cam-a", "cam-b", "floor")}
        assert 1 <= entries["floor"] <= max(entries["cam-a"], entries["cam-b"]) + 1, entries
    finally:
        if agent is not None:
            code = agent.stop()
            assert code == 0, agent.tail()
        for link in (controller, observer):
            if link is not None:
                link.close()
        cams.close()
        shop.cleanup()

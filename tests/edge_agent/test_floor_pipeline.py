"""``type: floor`` on a real Mosquitto: a grid of ceiling cameras' detection streams in, shop-wide tracks and events out.

The detections are a ``--cameras grid`` scenario's (``fusion.sim``'s per-view noise and
occlusion), made image boxes of each camera (tests/support/floor.py) and projected and encoded
by the vision side's own ``DetectionPublisher``, so what crosses the broker is what the cameras'
``type: vision`` pipelines send. The reference is ``MultiViewTracker.update`` in process on the
same image detections.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edge_agent.config import ConfigError, validate_config
from edge_agent.mqtt_core import MqttSettings, ThreadedLink
from edge_agent.pipelines import build_pipeline, pipeline_types
from edge_agent.pipelines.floor import Config, FloorPipeline, TickAssembler, detection_topic
from edge_agent.pipelines.fusion import track_subscription, track_topic
from edge_agent.pipelines.vision import DetectionPublisher
from edge_agent.supervisor import PipelineRunner
from tests.support.floor import (
    CAMERAS_NODE,
    FLOOR_NODE,
    Grid,
    detection_stream,
    floor_config,
    grid,
    reference,
    write_zones,
)
from tests.support.sink import RecordingSink
from tests.support.wait import wait_for
from vision.events import ZoneEvents
from vision.multiview import FloorDetections, FloorFrame, MultiViewTracker, encode_frame
from vision.types import Detections
from vision.zones import ZonesConfig

SHOP = "shop-g"


@pytest.fixture(scope="module")
def single() -> Grid:
    return grid("single", seed=1)


class Shop:
    """The floor pipeline under a runner, a publisher standing in for the cameras, and a listener on its track topic."""

    def __init__(self, g: Grid, port: int, tmp_path, **kw) -> None:
        self.g = g
        base = {"restart_budget": 0, "latency_s": 0.3, "gate_interval_s": 0.2, "occupancy_interval_s": 60}
        self.cfg = Config.model_validate(floor_config(g, write_zones(g, tmp_path / "zones.yaml"), SHOP, port, **{**base, **kw}))
        self.pipe = build_pipeline(self.cfg)
        assert isinstance(self.pipe, FloorPipeline)
        self.sink = RecordingSink()
        self.runner = PipelineRunner(self.pipe, self.cfg, self.sink)
        self.tracks: list[dict] = []
        settings = MqttSettings(host="127.0.0.1", port=port, client_id="cameras")
        self.cams = ThreadedLink(settings, lambda m: None)
        self.listener = ThreadedLink(MqttSettings(host="127.0.0.1", port=port, client_id="fusion"), self._track, subscriptions=(track_subscription(SHOP),))
        self.publishers = {v.camera: DetectionPublisher(detection_stream(SHOP, v.homography), v.camera, lambda r: None) for v in g.views}
        self.sent = 0
        self.probed = False

    def _track(self, msg) -> None:
        body = json.loads(msg.payload)
        if body["camera"] == "floor":
            self.tracks.append(body)
        elif body["camera"] == "probe":
            self.probed = True

    def start(self) -> None:
        self.listener.start()
        self.cams.start()
        self.runner.start()
        self.cams.wait_connected(10)
        self.listener.wait_connected(10)
        # Both subscriptions are in place once a probe reaches each: an unknown camera, counted as such.
        wait_for(lambda: self.cams.publish_nowait(detection_topic(SHOP, CAMERAS_NODE, "probe"), b"{}", qos=0)
                 and self.pipe.health()["errors_by_reason"].get("unknown_camera"), 10, "the pipeline's subscription")
        wait_for(lambda: self.cams.publish_nowait(track_topic(SHOP, FLOOR_NODE, "probe"), b'{"camera": "probe"}', qos=0) and self.probed, 10, "the listener's subscription")

    def send(self, topic: str, payload: bytes) -> None:
        self.cams.publish_nowait(topic, payload, qos=0)
        self.sent += 1
        if self.sent % 400 == 0:  # flow control: never more than a few hundred frames in flight
            wait_for(lambda: self.pipe.stats["frames_received"] >= self.sent - 200, 30, "the pipeline to read its frames")

    def play(self, frames, skip=lambda k, cam: False) -> None:
        for k, per in frames:
            for cam, dets in per.items():
                if not skip(k, cam):
                    self.send(detection_topic(SHOP, CAMERAS_NODE, cam), self.publishers[cam].payload(k / 10, dets))

    def stop(self) -> None:
        self.runner.stop()
        self.cams.stop()
        self.listener.stop()


def _shop(g: Grid, broker, tmp_path, **kw) -> Shop:
    shop = Shop(g, broker.port, tmp_path, **kw)
    shop.start()
    return shop


def _recent(g: Grid) -> Grid:
    """The grid's frames moved to ticks that end a few seconds ago (node clocks are the wall clock)."""
    base = int((time.time() - len(g.frames) / 10 - 5) * 10)
    return Grid(g.scenario, g.views, g.merge, g.zones, [(base + k, per) for k, per in g.frames])


def _events(g: Grid, frames) -> list[tuple[str, int | None, str | None]]:
    """The zone events of the in-process reference's tracks, as (kind, track id, zone)."""
    mvt = MultiViewTracker(g.views, g.merge)
    ze = ZoneEvents(ZonesConfig.model_validate(g.zones), camera="floor")
    out = []
    for k, per in frames:
        if per:
            tracks, _ = mvt.update(per, ts=k / 10)
            out += [(e.kind, e.track_id, e.zone) for e in ze.update(tracks) if e.kind != "occupancy"]
    return out


def test_floor_is_a_pipeline_type_and_config_errors_are_precise() -> None:
    assert pipeline_types()["floor"].__name__ == "edge_agent.pipelines.floor"
    vision = {"type": "vision", "name": "c", "source": "x", "model": "m", "zones": "z"}
    floor = {"type": "floor", "name": "f", "shop": SHOP, "zones": "z", "cameras": [{"camera": "c0", "node": "c0-cam"}], "broker": {"username": f"{SHOP}.floor"}}
    user = {"broker": {"username": f"{SHOP}.c0-cam"}}

    def error(entry: dict) -> str:
        with pytest.raises(ConfigError) as exc:
            validate_config({"shop": SHOP, "node": "n", "pipelines": [entry]}, source="agent.yaml")
        return str(exc.value)

    marks = {"image_px": [[0, 0], [100, 0], [100, 100]], "floor_m": [[0, 0], [1, 0], [1, 1]]}
    assert "key 'pipelines.0.detections': a homography needs at least 4 floor marks (image_px/floor_m pairs), got 3" in error({**vision, "detections": {"shop": SHOP, **marks}})
    assert "image_px has 4 points and floor_m 3" in error({**vision, "detections": {"shop": SHOP, "image_px": [[0, 0], [1, 0], [1, 1], [0, 1]], "floor_m": marks["floor_m"]}})
    assert "key 'pipelines.0.detections.anchor': Input should be 'center' or 'bottom'" in error(
        {**vision, "detections": {"shop": SHOP, "homography": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "anchor": "feet"}})
    assert "give either homography" in error({**vision, "detections": {"shop": SHOP}})
    assert "not both" in error({**vision, "detections": {"shop": SHOP, "homography": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], **marks}})
    assert "invertible" in error({**vision, "detections": {"shop": SHOP, "homography": [[1, 0, 0], [0, 0, 0], [0, 0, 1]]}})
    line = [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert "no three of them on one line" in error({**vision, "detections": {"shop": SHOP, "image_px": line, "floor_m": line}})
    assert "beyond the horizon" in error({**vision, "detections": {"shop": SHOP, "homography": [[1, 0, 0], [0, 1, 0], [0, -0.01, 1]], "image_size": [640, 480]}})
    assert "key 'pipelines.0.cameras.0.coverage': coverage is a floor polygon: give at least 3 corners" in error({**floor, "cameras": [{"camera": "c0", "node": "n", "coverage": [[0, 0], [1, 0]]}]})
    assert "key 'pipelines.0.cameras': camera names must be unique; repeated: ['c0']" in error({**floor, "cameras": [{"camera": "c0", "node": "n"}, {"camera": "c0", "node": "m"}]})
    assert "key 'pipelines.0.cameras.0.camera': invalid camera name 'c/0'" in error({**floor, "cameras": [{"camera": "c/0", "node": "n"}]})
    # Streams are bound to the identity that publishes them: each camera names its publisher's node, each publisher has a user of the shop.
    assert "key 'pipelines.0.cameras.0.node': Field required" in error({**floor, "cameras": [{"camera": "c0"}]})
    assert "key 'pipelines.0.cameras.0.node': invalid node (the node part of the camera's publishing user) 'a.b'" in error({**floor, "cameras": [{"camera": "c0", "node": "a.b"}]})
    assert f"broker.username (the track stream's publisher) is required: the stream goes to local/v1/{SHOP}/" in error({**floor, "broker": {}})
    assert "broker.username (the track stream's publisher) 'shop-x.floor' is not a user of shop 'shop-g'" in error({**floor, "broker": {"username": "shop-x.floor"}})
    quiet = validate_config({"shop": SHOP, "node": "n", "pipelines": [{**floor, "broker": {}, "publish_tracks": False}]})  # publishes nothing: no user needed
    assert quiet.pipelines[0].publish_tracks is False
    homography = {"homography": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}
    assert "key 'pipelines.0.detections': detections.broker.username is required" in error({**vision, "detections": {"shop": SHOP, **homography}})
    assert "detections.broker.username 'pi-1' is not a user of shop 'shop-g'" in error({**vision, "detections": {"shop": SHOP, **homography, "broker": {"username": "pi-1"}}})
    assert "key 'pipelines.0.tracks': tracks.broker.username is required" in error({**vision, "tracks": {"shop": SHOP, "px_per_m": 60}})
    fusion = {"type": "fusion", "name": "fu", "shop": SHOP, "layout": "l"}
    assert "key 'pipelines.0.track_node': Field required" in error(fusion)
    assert "key 'pipelines.0.track_node': invalid track_node (a node id) 'Track'" in error({**fusion, "track_node": "Track"})
    assert "key 'pipelines.0.tick_hz': Input should be greater than 0" in error({**floor, "tick_hz": 0})
    assert "key 'pipelines.0.merge.gate_m'" in error({**floor, "merge": {"gate_m": 0}})
    ok = validate_config({"shop": SHOP, "node": "n", "pipelines": [
        {**vision, "detections": {"shop": SHOP, "image_px": [*line[:2], [3, 3], [0, 3]], "floor_m": [[0, 0], [0.01, 0], [0.03, 0.03], [0, 0.03]], **user}}, floor]})
    assert [p.type for p in ok.pipelines] == ["vision", "floor"]
    assert ok.pipelines[0].detections.node() == ok.pipelines[1].cameras[0].node == "c0-cam" and ok.pipelines[1].track_node() == "floor"


def test_ticks_take_each_cameras_nearest_frame_and_leave_a_silent_camera_out() -> None:
    def frame(cam: str, ts: float, n: int = 1) -> FloorFrame:
        xy = np.full((n, 2), 1.0)
        return FloorFrame(cam, ts, 0, FloorDetections(xy, np.c_[xy - 0.2, xy + 0.2], np.full(n, 0.9)))

    a = TickAssembler(["a", "b", "c"], tick_hz=10, max_frames_per_tick=2, max_future_s=1.0)
    now = 100.0
    assert a.add(frame("a", 10.03), now) is None and a.add(frame("a", 10.01), now) == "out_of_order"
    assert a.add(frame("b", 9.96), now) is None and a.add(frame("b", 9.99), now) is None  # the nearer one wins
    assert a.add(frame("c", 10.16), now) is None  # c's frame belongs to the next tick: c is left out of tick 10.0
    assert a.add(frame("x", 10.0), now) == "unknown_camera" and a.add(frame("a", 102.0), now) == "future"
    assert a.close(10.0) == []  # tick 10.0's window is still open until 10.05
    [(ts, frames)] = a.close(10.06)
    assert ts == pytest.approx(10.0) and sorted(frames) == ["a", "b"]
    assert a.add(frame("c", 10.04), now) == "out_of_order" and a.add(frame("b", 10.04), now) == "late"
    assert a.add(frame("a", 10.18), now) is None and a.add(frame("a", 10.19), now) is None and a.add(frame("a", 10.2), now) == "flood"
    [(ts, frames)] = a.close(20.0)
    assert ts == pytest.approx(10.2) and sorted(frames) == ["a", "c"]  # only ticks someone delivered to come out
    # Left out is not "saw nobody": one view's lone person where three views look is doubted only if the other two looked.
    square = [(0.0, 0.0), (3.0, 0.0), (3.0, 3.0), (0.0, 3.0)]
    mvt = MultiViewTracker.on_floor({"a": square, "b": square, "c": square})
    lone = frame("a", 0).detections
    assert mvt.merge_floor({"a": lone}).detections.scores.tolist() == pytest.approx([0.9])
    assert mvt.merge_floor({"a": lone, "b": FloorDetections.empty(), "c": FloorDetections.empty()}).detections.scores.tolist() == pytest.approx([0.9 * 0.7])


@pytest.mark.timeout(180)
def test_over_the_broker_it_tracks_as_the_in_process_tracker_does(single, broker, tmp_path) -> None:
    g = _recent(single)
    alive = {v.camera for v in g.views[::8]}  # for 8 s, all but 7 of the 49 cameras go silent (a switch down), then come back
    k0 = g.frames[0][0]

    def skip(k: int, cam: str) -> bool:
        return cam not in alive and 60 <= k - k0 < 140

    frames = [(k, {c: d for c, d in per.items() if not skip(k, c)}) for k, per in g.frames]
    want = reference(g, frames)
    assert sum(len(t["tracks"]) for t in want) > 150, "the scenario's shopper is tracked"
    # Had the silent cameras counted as seeing nobody, the lone views' boxes would have been doubted and the tracks differ.
    nobody = [(k, {c: (d if not skip(k, c) else Detections.empty()) for c, d in per.items()}) for k, per in g.frames]
    assert reference(g, nobody) != want
    # The frames are replayed far faster than real time; with nothing arriving for latency_s the
    # pipeline closes ticks at the wall clock's pace, so a publisher stalled that long (a loaded CI
    # machine) would make the next frames late. A latency above any such stall keeps the replay exact.
    shop = _shop(g, broker, tmp_path, latency_s=3.0)
    try:
        shop.play(g.frames, skip)
        wait_for(lambda: len(shop.tracks) >= len(want), 60, f"{len(want)} track messages")
        wait_for(lambda: shop.sink.gates.get("floor_late_ratio"), 10, "the gate metrics")
        health = shop.pipe.health()
    finally:
        shop.stop()
    assert [t["ts"] for t in shop.tracks] == [t["ts"] for t in want]
    assert [(t["tracks"], t["ended"]) for t in shop.tracks] == [(t["tracks"], t["ended"]) for t in want], "same ids, same floor positions"
    assert all(t["camera"] == "floor" for t in shop.tracks)
    got = [(kind, d["track_id"], d["zone"]) for kind, source, d in shop.sink.events if source == "floor"]
    assert got == _events(g, frames) and [k for k, _, _ in got].count("person_entered") == 1 and "zone_enter" in [k for k, _, _ in got]
    assert health["errors_by_reason"] == {"unknown_camera": health["errors_by_reason"]["unknown_camera"]}, "nothing but the probes dropped"
    assert shop.pipe.stats["ticks_cameras"] == sum(len(per) for _, per in frames), "the silent cameras were left out of their ticks"
    assert shop.sink.gates["floor_late_ratio"] == (0.0, "higher") and shop.sink.gates["floor_cameras_live_ratio"][1] == "lower"
    assert "49/49 cameras live" in health["detail"]


@pytest.mark.timeout(180)
def test_late_malformed_and_flooding_input_is_counted_and_the_rest_tracked(single, broker, tmp_path) -> None:
    g = _recent(single)
    frames = g.frames[:120]
    want = reference(g, frames)
    # The stalled camera's frame comes `stall` ticks (3 s of data time) late, past latency_s 2 s: late by the data
    # alone. The replay runs faster than real time, so a latency_s shorter than a publisher stall on a loaded
    # machine would let the wall clock close ticks and make other frames late too.
    stall = 30
    shop = _shop(g, broker, tmp_path, latency_s=2.0)
    flood, late_cam = g.views[3].camera, g.views[7].camera
    xy = np.array([[1.0, 1.0]])
    person = FloorDetections(xy, np.c_[xy - 0.2, xy + 0.2], np.array([0.95]))
    try:
        k0 = frames[0][0]
        for k, per in frames:
            for cam, dets in per.items():
                payload = shop.publishers[cam].payload(k / 10, dets)
                if cam == late_cam and 40 <= k - k0 <= 40 + stall:
                    if k - k0 == 40:  # the camera stalls: its frame of tick 40 comes three seconds late, the next ones never
                        held = payload
                    if k - k0 == 45:
                        # Another node's credentials forging the stalled camera's frame (a person it never saw) under its own
                        # prefix, the only one the shop broker lets it write: bound to CAMERAS_NODE, the camera takes it from no
                        # one else. Accepted, it would add a person to tick 45 and make the held frame below out of order.
                        shop.send(detection_topic(SHOP, "pi-9", late_cam), encode_frame(late_cam, k / 10, 1, person))
                    continue
                shop.send(detection_topic(SHOP, CAMERAS_NODE, cam), payload)
                if cam == flood and k - k0 == 50:
                    for i in range(5):  # a camera flooding its tick with near-copies (0.1-0.5 ms apart)
                        shop.send(detection_topic(SHOP, CAMERAS_NODE, cam), encode_frame(cam, k / 10 + 1e-4 * (i + 1), 99, FloorDetections.empty()))
            if k - k0 == 40 + stall:
                shop.send(detection_topic(SHOP, CAMERAS_NODE, late_cam), held)
                shop.send(detection_topic(SHOP, CAMERAS_NODE, late_cam), b"not json")
                shop.send(detection_topic(SHOP, CAMERAS_NODE, late_cam), json.dumps({"v": 1, "camera": late_cam, "ts": k / 10, "seq": 1, "d": [[1, 2, 3]]}).encode())
                shop.send(detection_topic(SHOP, CAMERAS_NODE, late_cam), encode_frame(flood, k / 10 + 0.01, 1, FloorDetections.empty()))  # another camera's name
                shop.send(detection_topic(SHOP, CAMERAS_NODE, late_cam), encode_frame(late_cam, time.time() + 60, 1, FloorDetections.empty()))  # a clock a minute fast
                shop.send(detection_topic(SHOP, CAMERAS_NODE, "c99-99"), encode_frame("c99-99", k / 10, 1, FloorDetections.empty()))
        wait_for(lambda: len(shop.tracks) >= len(want) - 1, 60, "the track messages")
        health = shop.pipe.health()
        errors = health["errors_by_reason"]
    finally:
        shop.stop()
    assert errors["late"] == 1 and errors["bad_json"] == 1 and errors["schema"] == 1 and errors["camera_mismatch"] == 1 and errors["future"] == 1
    assert errors["flood"] == 3  # max_frames_per_tick is 3: the frame and two copies kept, three dropped
    assert errors["wrong_node"] == 1
    assert errors["unknown_camera"] >= 2 and health["dropped_frames"] == sum(errors.values())
    # The stalled camera is simply missing from its ticks, the flood's extra copies are farther from the tick than
    # its own frame (so it stays the one used): everything else is tracked as in process.
    k0 = frames[0][0]
    without = [(k, {c: d for c, d in per.items() if not (c == late_cam and 40 <= k - k0 <= 40 + stall)}) for k, per in frames]
    assert [(t["ts"], t["tracks"]) for t in shop.tracks] == [(t["ts"], t["tracks"]) for t in reference(g, without)]
    reg = shop.pipe._registry
    assert reg.get_sample_value("shopfleet_floor_frames_dropped_total", {"camera": late_cam, "reason": "late"}) == 1
    assert reg.get_sample_value("shopfleet_floor_frames_dropped_total", {"camera": late_cam, "reason": "wrong_node"}) == 1
    assert reg.get_sample_value("shopfleet_floor_frames_dropped_total", {"camera": "_unknown", "reason": "unknown_camera"}) >= 2
    assert reg.get_sample_value("shopfleet_floor_ticks_total", {}) == len(shop.tracks)

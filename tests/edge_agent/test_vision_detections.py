"""``type: vision`` with ``detections:``: the real detector on the fixture clip, each frame's boxes on the floor over a real broker."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_agent.mqtt_core import MqttSettings, ThreadedLink
from edge_agent.pipelines import build_pipeline
from edge_agent.pipelines import vision as vision_pipeline
from edge_agent.pipelines.floor import detection_subscription, detection_topic
from edge_agent.pipelines.vision import Config
from edge_agent.supervisor import PipelineRunner
from tests.support.sink import RecordingSink
from tests.support.vision import PLAZA_ZONES, clip_assets
from tests.support.wait import wait_for
from vision.multiview import decode_frame

SHOP = "shop-v"
FRAMES = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """The model package, the plaza zones and a short full-size clip of vtest.avi."""
    return clip_assets(tmp_path_factory.mktemp("vision-detections"), FRAMES, PLAZA_ZONES)


@pytest.mark.timeout(180)
def test_each_frames_detections_go_out_on_the_floor_through_the_homography(assets, broker, monkeypatch) -> None:
    seen: list[tuple[float, np.ndarray, np.ndarray]] = []  # what the detector gave the stream: (ts, image boxes, scores)
    lock = threading.Lock()
    frame = vision_pipeline.DetectionPublisher.frame

    def recording(self, ts, dets):
        with lock:
            seen.append((ts, dets.xyxy.copy(), dets.scores.copy()))
        return frame(self, ts, dets)

    monkeypatch.setattr(vision_pipeline.DetectionPublisher, "frame", recording)
    got: list[tuple[str, bytes]] = []
    listener = ThreadedLink(MqttSettings(host="127.0.0.1", port=broker.port, client_id="floor"), lambda m: got.append((m.topic, m.payload)),
                            subscriptions=(detection_subscription(SHOP),))
    listener.start()
    listener.wait_connected(10)
    # The floor marks: the image's corners are 7.68 x 5.76 m of floor, the image's (0, 0) at the floor's (1, 2).
    marks = {"image_px": [[0, 0], [768, 0], [768, 576], [0, 576]], "floor_m": [[1, 2], [8.68, 2], [8.68, 7.76], [1, 7.76]]}
    cfg = Config.model_validate({
        "type": "vision", "name": "cam-1", "source": assets["clip"], "model": assets["model"], "zones": assets["zones"], "threads": 2,
        "restart_budget": 0, "detections": {"shop": SHOP, "broker": {"port": broker.port, "username": f"{SHOP}.plaza-detections"}, "anchor": "bottom", "image_size": [768, 576], **marks}})
    runner = PipelineRunner(build_pipeline(cfg), cfg, RecordingSink())
    # Frames processed before the stream's connection is up are counted (detections_unpublished), not sent.
    try:
        runner.start()
        wait_for(lambda: runner.state == "failed", 120, "the clip to end")
    finally:
        runner.stop()
        listener.stop()
    errors = runner.pipeline.health()["errors_by_reason"]
    assert len(seen) == FRAMES and len(got) == FRAMES - errors.get("detections_unpublished", 0) >= FRAMES // 2
    assert all(topic == detection_topic(SHOP, "plaza-detections", "plaza") for topic, _ in got)  # under its user's node
    frames = [decode_frame(p) for _, p in got]
    by_ts = {ts: (boxes, scores) for ts, boxes, scores in seen}
    assert [f.seq for f in frames] == sorted(f.seq for f in frames) and sum(len(f.detections) for f in frames) >= 2 * len(frames)
    for f in frames:
        boxes, scores = by_ts[f.ts]
        assert f.camera == "plaza"
        b = boxes.astype(np.float64)
        # anchor bottom: the feet, bottom middle of each box, 1 cm per pixel from (1, 2)
        assert np.allclose(f.detections.xy, np.c_[(b[:, 0] + b[:, 2]) / 2 / 100 + 1, b[:, 3] / 100 + 2], atol=1e-6)
        half = (b[:, 2:] - b[:, :2]) / 200
        assert np.allclose(f.detections.boxes, np.c_[f.detections.xy - half, f.detections.xy + half], atol=1e-6)
        assert f.detections.scores.tolist() == pytest.approx(scores.tolist())
        assert ((f.detections.xy >= [1, 2]) & (f.detections.xy <= [8.68, 7.76])).all()

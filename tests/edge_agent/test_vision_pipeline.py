"""``type: vision`` under the agent: events, occupancy readings, health, alerts, bad config.

Uses the real YOLOv4-tiny package (cached per machine, see tests/vision/conftest.py), a real
clip of vtest.avi, the real supervisor and, for the end-to-end test, a real agent and Mosquitto.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_agent.config import validate_config
from edge_agent.pipelines import build_pipeline, pipeline_types
from edge_agent.pipelines.vision import Config
from edge_agent.protocol import Channel, Event, Heartbeat, Telemetry
from edge_agent.supervisor import PipelineRunner
from tests.support.inproc import uplinks
from tests.support.recorder import wait_for
from tests.support.sink import RecordingSink
from tests.support.vision import clip_assets

ZONES = {
    "camera": "plaza",
    "door": {"a": [650, 250], "b": [650, 520], "enter_from": "left"},
    "shelves": [{"name": "shelf-1", "polygon": [[350, 200], [560, 200], [560, 330], [350, 330]], "dwell_seconds": 2.0}],
}
CLIP = 60  # frames: two people walk in through the door line within the first six seconds


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """The model package, a zones file and a 60-frame full-size clip of vtest.avi."""
    return clip_assets(tmp_path_factory.mktemp("vision-assets"), CLIP, ZONES)


def _config(assets: dict[str, str], **kw) -> Config:
    base = {"type": "vision", "name": "cam-1", "source": assets["clip"], "model": assets["model"], "zones": assets["zones"], "threads": 2, "restart_budget": 0}
    return Config.model_validate({**base, **kw})


def test_vision_is_a_pipeline_type_and_config_is_strict(assets) -> None:
    assert pipeline_types()["vision"].__name__ == "edge_agent.pipelines.vision"
    with pytest.raises(ValidationError, match="fps_limit"):
        _config(assets, fps_limit=5)
    with pytest.raises(ValidationError, match="tracker.max_lost"):
        _config(assets, tracker={"max_lost": 3})
    assert _config(assets, tracker={"max_lost_frames": 3}).tracker.max_lost_frames == 3


def test_clip_gives_events_occupancy_and_health(assets) -> None:
    cfg = _config(assets, occupancy_interval_s=0.5)
    pipe = build_pipeline(cfg)
    sink = RecordingSink()
    runner = PipelineRunner(pipe, cfg, sink)
    runner.start()
    try:
        wait_for(lambda: runner.state == "failed", 60, "the clip to end (a file source ending is a failure)")
    finally:
        runner.stop()
    kinds = [t for t, _, _ in sink.events]
    assert kinds.count("person_entered") >= 2 and "zone_enter" in kinds and "occupancy" not in kinds
    entered = [d for t, s, d in sink.events if t == "person_entered"]
    assert all(d["camera"] == "plaza" and d["zone"] == "door" and isinstance(d["track_id"], int) for d in entered)
    occ = [r for r in sink.read if r.name == "occupancy"]
    assert occ and all(r.source == "plaza" and r.unit == "people" for r in occ)
    assert max(r.value for r in occ) == kinds.count("person_entered") - kinds.count("person_exited")
    h = runner.health()
    assert h.kind == "vision" and h.state == "failed" and f"ended after {CLIP} frames" in h.detail


def _frames(health: dict) -> int:
    m = re.search(r"; (\d+) frames,", health.get("detail", ""))
    return int(m.group(1)) if m else 0


def test_running_health_reports_fps_and_frame_age(assets) -> None:
    cfg = _config(assets, live=True, restart_budget=5)  # a file played like a camera, at 10 fps
    pipe = build_pipeline(cfg)
    runner = PipelineRunner(pipe, cfg, RecordingSink())
    runner.start()
    try:
        # fps over a handful of frames, not two: two frames a scheduler hiccup apart say nothing.
        h = wait_for(lambda: (x := pipe.health()).get("fps", 0) > 0 and _frames(x) >= 8 and x, 60, "fps over 8 frames in health")
        assert 0 < h["fps"] <= 20 and h["last_frame_age_s"] is not None and h["last_frame_age_s"] < 5
        assert "yolov4-tiny fp32" in h["detail"] and h["dropped_frames"] >= 0
        model = runner.health()
        assert model.state == "running" and model.fps and model.fps > 0
    finally:
        runner.stop()


def test_corrupt_model_fails_with_the_fix_and_a_counted_reason(assets, tmp_path) -> None:
    bad = tmp_path / "pkg"
    shutil.copytree(assets["model"], bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[5000] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    cfg = _config(assets, model=str(bad))
    pipe = build_pipeline(cfg)
    runner = PipelineRunner(pipe, cfg, RecordingSink())
    runner.start()
    try:
        wait_for(lambda: runner.state == "failed", 30, "the pipeline to fail")
    finally:
        runner.stop()
    assert "sha256" in runner.last_error and "fetch-model" in runner.last_error
    assert pipe.health()["errors_by_reason"] == {"sha256-mismatch": 1}


def test_dark_camera_alert_fires_and_resolves_when_frames_return(assets, tmp_path) -> None:
    late = tmp_path / "cam.avi"  # the camera is down at start: nothing at this path yet
    cfg = _config(assets, source=str(late), live=True, dark_after_s=0.3, reconnect_initial_s=0.05, reconnect_max_s=0.1, restart_budget=5)
    pipe = build_pipeline(cfg)
    sink = RecordingSink()
    runner = PipelineRunner(pipe, cfg, sink)
    runner.start()
    try:
        alert = wait_for(lambda: sink.alerts, 30, "the camera_dark alert")[0]
        assert alert[:4] == ("camera_dark", "firing", "warning", "plaza") and "no frame for 0.3s" in alert[4]
        wait_for(lambda: pipe.health().get("errors_by_reason", {}).get("reconnect", 0) >= 2, 30, "reconnects counted")
        assert runner.state == "running"  # a dark camera is retried by the capture, not a pipeline failure
        shutil.copy(assets["clip"], late)  # the camera comes back
        wait_for(lambda: len(sink.alerts) >= 2, 30, "the alert to resolve")
        assert sink.alerts[1][:2] == ("camera_dark", "resolved")
    finally:
        runner.stop()


def test_agent_sends_camera_events_through_the_outbox(make_agent, recorder, assets, tmp_path: Path) -> None:
    pipelines = [
        {"type": "vision", "name": "cam-1", "source": assets["clip"], "model": assets["model"], "zones": assets["zones"], "threads": 2,
         "telemetry_interval_s": 0.5, "occupancy_interval_s": 0.5, "restart_budget": 0}
    ]  # fmt: skip
    validate_config({"shop": "shop-a", "node": "pi-1", "pipelines": pipelines, "outbox": {"path": str(tmp_path / "o.db")}})
    agent = make_agent(config={"pipelines": pipelines})
    events = wait_for(lambda: [m for m in uplinks(recorder, Channel.EVENTS) if isinstance(m, Event) and m.type == "person_entered"], 60, "person_entered")
    assert events[0].source == "plaza" and events[0].data["zone"] == "door"
    tel = wait_for(
        lambda: [r for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Telemetry) for r in m.readings if r.name == "occupancy"], 30, "occupancy"
    )
    assert tel[0].source == "plaza"
    agent.heartbeat()
    hb = wait_for(lambda: [m for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Heartbeat) and "cam-1" in m.pipelines], 30, "a heartbeat")
    assert hb[-1].pipelines["cam-1"].kind == "vision"
    # the agent's /metrics carries the pipeline's own counters (labelled by pipeline) and the health gauges
    reg = agent.registry
    assert reg.get_sample_value("shopfleet_vision_frames_total", {"camera": "plaza", "pipeline": "cam-1"}) > 0
    assert reg.get_sample_value("shopfleet_vision_events_total", {"camera": "plaza", "kind": "person_entered", "pipeline": "cam-1"}) >= 1
    assert reg.get_sample_value("shopfleet_agent_pipeline_last_frame_age_seconds", {"pipeline": "cam-1"}) is not None


def test_real_vision_fps_reaches_the_heartbeat_gate_metrics(make_agent, recorder, assets) -> None:
    pipelines = [
        {"type": "vision", "name": "cam-1", "source": assets["clip"], "model": assets["model"], "zones": assets["zones"], "threads": 2,
         "live": True, "gate_interval_s": 0.3}
    ]  # fmt: skip
    agent = make_agent(config={"pipelines": pipelines})
    gates = wait_for(lambda: (g := agent.gate_metrics()).get("vision_fps", 0) > 0 and g, 60, "vision_fps among the gate metrics")
    assert 0 < gates["vision_fps"] <= 20  # the clip plays live at 10 fps
    assert 0 <= gates["vision_dropped_ratio"] <= 1 and gates["vision_error_ratio"] >= 0
    agent.heartbeat()
    hb = wait_for(
        lambda: [m for m in uplinks(recorder, Channel.TELEMETRY) if isinstance(m, Heartbeat) and "vision_fps" in m.metrics], 30, "a heartbeat with vision_fps"
    )
    assert hb[-1].metrics["vision_fps"] > 0 and hb[-1].pipelines["cam-1"].state == "running"

"""The whole pipeline on a real clip, and the ``shopfleet vision run`` command."""

from __future__ import annotations

import json
import threading

import cv2
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry

from shopfleet.cli import main as shopfleet_main
from tests.support.vision import CLIP_FRAMES, PLAZA_ZONES
from vision.capture import Capture
from vision.errors import ZonesInvalid
from vision.pipeline import Pipeline
from vision.zones import ZonesConfig

DOOR_X = PLAZA_ZONES["door"]["a"][0]


def test_tracks_are_stable(plaza_run) -> None:
    tracks = plaza_run["tracks"]
    # Six people are in view over these 8 s; a tracker that fragments makes many short ids.
    assert 4 <= len(tracks) <= 12, {k: len(v) for k, v in tracks.items()}
    long_tracks = [v for v in tracks.values() if len(v) >= 30]
    assert len(long_tracks) >= 4
    for v in long_tracks:  # an id follows one person: no jumps across the plaza between frames
        xy = np.array([(x, y) for _, x, y in v])
        assert np.abs(np.diff(xy, axis=0)).max() < 60


def test_door_events_match_the_tracks_that_crossed_the_line(plaza_run) -> None:
    events, tracks = plaza_run["events"], plaza_run["tracks"]
    entered = {e.track_id for e in events if e.kind == "person_entered"}
    exited = {e.track_id for e in events if e.kind == "person_exited"}
    assert len(entered) >= 3 and not exited  # everyone in this clip walks in from the road
    lo, hi = PLAZA_ZONES["door"]["a"][1], PLAZA_ZONES["door"]["b"][1]
    for tid in entered:  # every entered track was right of the door line and is now left of it
        xs = [x for _, x, y in tracks[tid] if lo <= y <= hi + 40]
        assert xs[0] > DOOR_X - 5 and tracks[tid][-1][1] < DOOR_X
    crossed = {tid for tid, v in tracks.items() if v[0][1] > DOOR_X + 5 and v[-1][1] < DOOR_X - 5 and lo <= v[0][2] <= hi}
    assert crossed <= entered
    occupancy = [e.value for e in events if e.kind == "occupancy"]
    assert occupancy == [float(i) for i in range(1, len(entered) + 1)]


def test_zone_events_pair_up(plaza_run) -> None:
    events = plaza_run["events"]
    for e in events:
        assert e.camera == "plaza" and 0 <= e.ts <= CLIP_FRAMES / 10
    enters = [e for e in events if e.kind == "zone_enter"]
    dwells = [e for e in events if e.kind == "dwell"]
    assert enters and dwells and all(d.value >= 2.0 for d in dwells)
    for d in dwells:  # a dwell comes after its track entered the zone, at least dwell_seconds later
        first = min(e.ts for e in enters if e.track_id == d.track_id)
        assert d.ts - first >= 2.0 - 1e-9
    for x in (e for e in events if e.kind == "zone_exit"):
        assert any(e.track_id == x.track_id and e.ts <= x.ts for e in enters)


def test_summary_and_metrics(plaza_run) -> None:
    s, reg = plaza_run["summary"], plaza_run["registry"]
    assert s["frames"] == CLIP_FRAMES and s["fps"] > 0 and s["inference_ms_p95"] >= s["inference_ms_p50"] > 0
    assert set(s["stage_ms_mean"]) >= {"preprocess", "infer", "postprocess", "track", "events"}
    assert s["events"]["person_entered"] == len({e.track_id for e in plaza_run["events"] if e.kind == "person_entered"})
    assert reg.get_sample_value("shopfleet_vision_frames_total", {"camera": "plaza"}) == CLIP_FRAMES
    assert reg.get_sample_value("shopfleet_vision_events_total", {"camera": "plaza", "kind": "person_entered"}) == s["events"]["person_entered"]
    assert reg.get_sample_value("shopfleet_vision_occupancy", {"camera": "plaza"}) == s["occupancy"]
    assert reg.get_sample_value("shopfleet_vision_stage_seconds_count", {"stage": "infer"}) == CLIP_FRAMES


def test_zones_outside_the_image_stop_the_pipeline(detector, short_clip) -> None:
    cap = Capture(str(short_clip), camera="plaza")  # 384x288, but the zones are drawn for 768x576
    try:
        pipe = Pipeline(detector, [(cap, ZonesConfig.model_validate(PLAZA_ZONES))])
        with pytest.raises(ZonesInvalid, match="outside the 384x288 image"):
            pipe.run(threading.Event(), max_frames=5)
        assert pipe.frames == 0
    finally:
        cap.close()


def test_two_cameras_share_one_batched_detector(detector, short_clip) -> None:
    zones = {"camera": "x", "door": {"a": [325, 125], "b": [325, 260], "enter_from": "left"}}
    caps = [Capture(str(short_clip), camera=n) for n in ("a", "b")]
    try:
        pipe = Pipeline(detector, [(c, ZonesConfig.model_validate({**zones, "camera": c.camera})) for c in caps])
        pipe.run(threading.Event(), max_frames=10)
        assert pipe.cams["a"].frames == pipe.cams["b"].frames == 10
        assert len(pipe.stage_ms["infer"]) < 20  # rounds carried both cameras in one inference call
        assert pipe.cams["a"].track_ids and pipe.cams["b"].track_ids
    finally:
        for c in caps:
            c.close()


def test_run_command_writes_events_video_and_summary(model_pkg, media, tmp_path, capsys) -> None:
    zones = tmp_path / "zones.yaml"
    zones.write_text(yaml.safe_dump(PLAZA_ZONES))
    events, video = tmp_path / "events.jsonl", tmp_path / "annotated.avi"
    rc = shopfleet_main(
        ["vision", "run", "--source", str(media["vtest.avi"]), "--model", str(model_pkg.path), "--zones", str(zones), "--max-frames", "25",
         "--events-out", str(events), "--annotate-out", str(video), "--threads", "2"]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 25 and {"fps", "inference_ms_p50", "inference_ms_p95", "events"} <= summary.keys()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert sum(summary["events"].values()) == len(lines) and all(e["camera"] == "plaza" for e in lines)
    v = cv2.VideoCapture(str(video))
    assert int(v.get(cv2.CAP_PROP_FRAME_COUNT)) == 25 and (v.get(3), v.get(4)) == (768, 576)
    drawn = v.read()[1]
    v.release()
    src = cv2.VideoCapture(str(media["vtest.avi"]))
    plain = src.read()[1]
    src.release()
    door = (slice(270, 500), slice(DOOR_X - 1, DOOR_X + 2))
    assert np.abs(drawn[door].astype(int) - plain[door].astype(int)).mean() > 40  # the door arrow is drawn
    assert np.abs(drawn[400:560, 20:300].astype(int) - plain[400:560, 20:300].astype(int)).mean() < 10  # lawn untouched


@pytest.mark.parametrize(
    "case,words",
    [
        pytest.param("corrupt-model", "corrupt or was replaced", id="corrupt-model"),
        pytest.param("missing-source", "does not exist; check --source", id="missing-source"),
        pytest.param("not-a-video", "delivered no frames", id="not-a-video"),
        pytest.param("bad-zones", "key 'door.enter_from'", id="bad-zones"),
    ],
)
def test_run_command_bad_input_is_a_clear_error(case, words, model_pkg, media, tmp_path, capsys) -> None:
    import shutil

    model = tmp_path / "pkg"
    shutil.copytree(model_pkg.path, model)
    zones = tmp_path / "zones.yaml"
    zones.write_text(yaml.safe_dump(PLAZA_ZONES))
    source = str(media["vtest.avi"])
    if case == "corrupt-model":
        data = bytearray((model / "model.onnx").read_bytes())
        data[1000] ^= 1
        (model / "model.onnx").write_bytes(bytes(data))
    elif case == "missing-source":
        source = str(tmp_path / "gone.mp4")
    elif case == "not-a-video":
        source = str(tmp_path / "notes.mp4")
        (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    elif case == "bad-zones":
        zones.write_text(yaml.safe_dump({**PLAZA_ZONES, "door": {**PLAZA_ZONES["door"], "enter_from": "inside"}}))
    rc = shopfleet_main(["vision", "run", "--source", source, "--model", str(model), "--zones", str(zones), "--max-frames", "3", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and words in err, err
    assert "Traceback" not in err


def test_pipeline_survives_a_frame_that_fails_to_process(detector, short_clip) -> None:
    """A loop never dies of one bad frame: the failure is counted by reason and the run goes on."""
    registry = CollectorRegistry()
    from vision.metrics import VisionMetrics

    cap = Capture(str(short_clip), camera="c")
    zones = ZonesConfig.model_validate({"camera": "c"})
    pipe = Pipeline(detector, [(cap, zones)], metrics=VisionMetrics(registry))
    real_infer = detector.infer
    calls = {"n": 0}

    def infer(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("onnxruntime: simulated device error")
        return real_infer(batch)

    pipe.detector = type("D", (), {"preprocess": detector.preprocess, "infer": staticmethod(infer), "postprocess": detector.postprocess, "manifest": detector.manifest})()
    try:
        pipe.run(threading.Event(), max_frames=6)
    finally:
        cap.close()
    assert pipe.frames == 6 and pipe.errors == {"RuntimeError": 1}
    assert registry.get_sample_value("shopfleet_vision_errors_total", {"camera": "c", "reason": "RuntimeError"}) == 1

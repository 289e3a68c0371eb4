"""int8 quantization of the real model, and validation of the typed stage values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shopfleet.cli import main as shopfleet_main
from vision.errors import FrameInvalid
from vision.model import load_package
from vision.quantize import match_f1
from vision.types import Detections, Frame, ShopEvent, Tracks


def test_quantize_command_writes_an_int8_package_that_agrees_with_fp32(model_pkg, media, tmp_path, capsys) -> None:
    out = tmp_path / "int8"
    rc = shopfleet_main(
        ["vision", "quantize", "--model", str(model_pkg.path), "--calibration", str(media["vtest.avi"]), "--frames", "8", "--step", "60",
         "--eval-frames", "8", "--threads", "2", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pkg = load_package(out)
    m = pkg.manifest
    assert m.precision == "int8" and m.labels == model_pkg.manifest.labels and report["sha256"] == m.sha256
    assert m.provenance["quantized_from_sha256"] == model_pkg.manifest.sha256 and "8 frames of vtest.avi" in m.provenance["calibration"]
    assert pkg.onnx_path.stat().st_size < model_pkg.onnx_path.stat().st_size / 2
    assert report["agreement_f1"] >= 0.7, report  # int8 still finds (nearly) the same people
    assert report["int8_fps"] > 0 and report["fp32_fps"] > 0


def test_quantize_command_with_unreadable_calibration_video(model_pkg, tmp_path, capsys) -> None:
    bad = tmp_path / "x.avi"
    bad.write_text("no video here")
    rc = shopfleet_main(["vision", "quantize", "--model", str(model_pkg.path), "--calibration", str(bad), "--out", str(tmp_path / "q")])
    assert rc == 2 and "calibration video" in capsys.readouterr().err


def _d(boxes, cls) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), 0.9, np.float32), np.array(cls, np.int64))


@pytest.mark.parametrize(
    "a,b,f1",
    [
        pytest.param([_d([[0, 0, 10, 10]], [0])], [_d([[0, 0, 10, 10]], [0])], 1.0, id="identical"),
        pytest.param([_d([[0, 0, 10, 10]], [0])], [_d([[0, 0, 10, 10]], [1])], 0.0, id="other-class"),
        pytest.param([_d([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])], [_d([[1, 1, 10, 10]], [0])], 2 / 3, id="one-missed"),
        pytest.param([_d([], [])], [_d([], [])], 1.0, id="both-empty"),
    ],
)
def test_match_f1(a, b, f1: float) -> None:
    assert match_f1(a, b) == pytest.approx(f1)


@pytest.mark.parametrize(
    "image,reason",
    [
        pytest.param(np.zeros((0, 0, 3), np.uint8), "empty", id="empty"),
        pytest.param(np.zeros((4, 4), np.uint8), "bad-shape", id="grey"),
        pytest.param(np.zeros((4, 4, 3), np.float32), "bad-shape", id="float"),
        pytest.param([[1, 2, 3]], "not-an-array", id="list"),
    ],
)
def test_frame_rejects_unusable_images(image, reason: str) -> None:
    with pytest.raises(FrameInvalid) as exc:
        Frame(image, "cam", 7, 0.0)
    assert exc.value.reason == reason and "frame 7 of cam" in str(exc.value)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        pytest.param({"xyxy": np.zeros((2, 4), np.float32), "scores": np.zeros(1, np.float32), "class_ids": np.zeros(1, np.int64)}, "shape", id="length-mismatch"),
        pytest.param({"xyxy": np.array([[5, 0, 1, 1]], np.float32), "scores": np.ones(1, np.float32), "class_ids": np.zeros(1, np.int64)}, "x2 >= x1", id="inverted-box"),
        pytest.param({"xyxy": np.zeros((1, 4), np.float32), "scores": np.array([1.5], np.float32), "class_ids": np.zeros(1, np.int64)}, "in \\[0, 1\\]", id="score-above-one"),
    ],
)
def test_detections_validate(kwargs, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Detections(**kwargs)


def test_tracks_ids_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Tracks(np.array([1, 1]), np.zeros((2, 4), np.float32), np.zeros(2, np.float32))


@pytest.mark.parametrize(
    "kwargs,words",
    [
        pytest.param({"kind": "person_waved", "track_id": 1}, "not one of", id="unknown-kind"),
        pytest.param({"kind": "person_entered"}, "needs a track_id", id="no-track"),
        pytest.param({"kind": "dwell", "track_id": 1, "value": 3.0}, "needs a zone", id="dwell-without-zone"),
        pytest.param({"kind": "occupancy"}, "needs a value", id="occupancy-without-value"),
    ],
)
def test_shop_event_validates(kwargs, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ShopEvent(camera="c", ts=0.0, **kwargs)


def test_shop_event_to_dict() -> None:
    e = ShopEvent("dwell", "c", 1.5, track_id=3, zone="shelf-1", value=4.0)
    assert e.to_dict() == {"kind": "dwell", "camera": "c", "ts": 1.5, "track_id": 3, "zone": "shelf-1", "value": 4.0}

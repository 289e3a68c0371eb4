"""The detector on real photos, and its pure pre/post-processing functions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vision.boxes import box_iou
from vision.detector import (
    HeadSpec,
    Letterbox,
    choose_providers,
    decode_heads,
    letterbox,
    nms,
    unletterbox,
)
from vision.types import Detections, Frame

PERSON, BUS = 0, 5


def _frame(path, camera: str = "cam", index: int = 0) -> Frame:
    return Frame(cv2.imread(str(path)), camera, index, 0.0)


def _boxes_of(d: Detections, cls: int) -> np.ndarray:
    return d.xyxy[d.class_ids == cls]


def test_bus_jpg_has_the_people_and_the_bus(detector, media) -> None:
    (d,) = detector.detect([_frame(media["bus.jpg"])])
    people = _boxes_of(d, PERSON)  # at the package's default score threshold (0.25)
    buses = _boxes_of(d, BUS)
    # bus.jpg (810x1080): people standing in front of a bus; yolov4-tiny is sure of the two outer
    # ones and less sure (~0.27) of the one in the middle.
    assert len(people) >= 3 and len(buses) == 1
    assert (d.scores[d.class_ids == PERSON] > 0.9).sum() >= 2 and d.scores[d.class_ids == BUS][0] > 0.8
    bus = buses[0]
    assert (bus[2] - bus[0]) > 0.8 * 810 and 100 < bus[1] < 300 and bus[3] > 700
    expected_people = np.array([[50, 400, 245, 905], [670, 380, 810, 880], [220, 405, 345, 860]], np.float32)
    iou = box_iou(expected_people, people)
    assert (iou.max(axis=1) > 0.5).all(), f"people found at {people.round()}"
    for x1, y1, x2, y2 in people:
        assert 1.5 < (y2 - y1) / (x2 - x1) < 5, "a standing person is taller than wide"


def test_zidane_jpg_has_two_people(detector, media) -> None:
    (d,) = detector.detect([_frame(media["zidane.jpg"])])
    people = _boxes_of(d, PERSON)[d.scores[d.class_ids == PERSON] > 0.4]
    assert len(people) >= 2
    right = people[np.argmax(people[:, 0])]
    assert right[0] > 640 and right[3] > 600  # Zidane stands in the right half down to the bottom


def test_a_batch_gives_the_same_answers_as_single_frames(detector, media) -> None:
    frames = [_frame(media["bus.jpg"], "a"), _frame(media["zidane.jpg"], "b")]
    batched = detector.detect(frames)
    for f, b in zip(frames, batched, strict=True):
        (single,) = detector.detect([f])
        np.testing.assert_allclose(b.xyxy, single.xyxy, atol=0.05)
        np.testing.assert_array_equal(b.class_ids, single.class_ids)


def test_class_filter_keeps_only_people(model_pkg, media) -> None:
    from vision.detector import OnnxDetector

    d = OnnxDetector(model_pkg, threads=1, classes=["person"]).detect([_frame(media["bus.jpg"])])[0]
    assert len(d) >= 3 and set(d.class_ids.tolist()) == {PERSON}
    with pytest.raises(ValueError, match="not labels"):
        OnnxDetector(model_pkg, classes=["shopper"])


@pytest.mark.parametrize(
    "available,wanted,expected",
    [
        pytest.param(["CPUExecutionProvider"], None, ["CPUExecutionProvider"], id="cpu-only"),
        pytest.param(["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"], None, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], id="gpu-best-first"),
        pytest.param(["CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"], ["cuda"], ["CUDAExecutionProvider", "CPUExecutionProvider"], id="configured-subset"),
        pytest.param(["CPUExecutionProvider", "AzureExecutionProvider"], ["openvino", "cpu"], ["CPUExecutionProvider"], id="wanted-but-absent"),
        pytest.param(["CoreMLExecutionProvider", "CPUExecutionProvider"], None, ["CoreMLExecutionProvider", "CPUExecutionProvider"], id="mac"),
    ],
)
def test_choose_providers(available, wanted, expected) -> None:
    assert choose_providers(available, wanted) == expected


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown execution provider"):
        choose_providers(["CPUExecutionProvider"], ["tpu"])


@settings(max_examples=60, deadline=None)
@given(w=st.integers(8, 1200), h=st.integers(8, 1200), data=st.data())
def test_letterbox_maps_boxes_back_exactly(w: int, h: int, data) -> None:
    img = np.zeros((h, w, 3), np.uint8)
    out, lb = letterbox(img, 416, 416)
    assert out.shape == (416, 416, 3)
    x1 = data.draw(st.floats(0, w - 1))
    y1 = data.draw(st.floats(0, h - 1))
    box = np.array([[x1, y1, data.draw(st.floats(x1, w)), data.draw(st.floats(y1, h))]], np.float64)
    net = box.copy()
    net[:, [0, 2]] = net[:, [0, 2]] * lb.scale + lb.pad_x
    net[:, [1, 3]] = net[:, [1, 3]] * lb.scale + lb.pad_y
    np.testing.assert_allclose(unletterbox(net, lb, w, h), box, atol=1e-6)


def test_decode_places_a_box_where_the_logits_say() -> None:
    spec = HeadSpec(np.array([[10.0, 20.0], [30, 60], [50, 100]]), stride=32, scale_x_y=1.0)
    raw = np.full((3 * 7, 4, 4), -10.0, np.float32)  # 3 anchors x (5 + 2 classes), 4x4 grid
    a, gy, gx = 1, 2, 3
    base = a * 7
    raw[base + 0, gy, gx] = 0.0  # sigmoid 0.5: centre of the cell
    raw[base + 1, gy, gx] = 0.0
    raw[base + 2, gy, gx] = np.log(2.0)  # twice the anchor width
    raw[base + 3, gy, gx] = 0.0
    raw[base + 4, gy, gx] = 5.0  # objectness ~0.993
    raw[base + 6, gy, gx] = 5.0  # class 1
    xyxy, scores, cls = decode_heads([raw], [spec], 0.5)
    assert cls.tolist() == [1] and scores[0] > 0.98
    np.testing.assert_allclose(xyxy[0], [3.5 * 32 - 30, 2.5 * 32 - 30, 3.5 * 32 + 30, 2.5 * 32 + 30], atol=1e-3)


_boxes = arrays(np.float64, st.tuples(st.integers(0, 30), st.just(4)), elements=st.floats(0, 500))


@settings(max_examples=150, deadline=None)
@given(raw=_boxes, seed=st.integers(0, 2**16), thr=st.floats(0.1, 0.9))
def test_nms_properties(raw: np.ndarray, seed: int, thr: float) -> None:
    xyxy = np.c_[np.minimum(raw[:, :2], raw[:, 2:]), np.maximum(raw[:, :2], raw[:, 2:]) + 1]
    rng = np.random.default_rng(seed)
    scores = rng.random(len(xyxy)).astype(np.float32)
    cls = rng.integers(0, 3, len(xyxy))
    keep = nms(xyxy, scores, cls, thr)
    if len(xyxy):
        assert keep[0] == int(np.argmax(scores))  # the best box always survives
    assert list(scores[keep]) == sorted(scores[keep], reverse=True)
    kept = xyxy[keep]
    iou = box_iou(kept, kept)
    same = cls[keep][:, None] == cls[keep][None, :]
    np.fill_diagonal(iou, 0)
    assert (iou[same] <= thr + 1e-9).all()  # no two kept boxes of one class overlap more than thr
    dropped = np.setdiff1d(np.arange(len(xyxy)), keep)
    for i in dropped:  # each dropped box is covered by a better kept box of its class
        cover = box_iou(xyxy[i : i + 1], kept)[0] * (cls[keep] == cls[i]) * (scores[keep] >= scores[i])
        assert cover.max() > thr


def test_unletterbox_clips_to_the_image() -> None:
    out = unletterbox(np.array([[-50.0, -50, 500, 500]]), Letterbox(1.0, 0, 0), 100, 80)
    assert out.tolist() == [[0, 0, 100, 80]]

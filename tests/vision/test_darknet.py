"""The Darknet -> ONNX converter: cfg parsing, weight accounting, and numerical agreement."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.vision.darknet_reference import forward
from vision.darknet import build_onnx, parse_cfg
from vision.errors import ConversionError
from vision.model import KNOWN_MODELS, read_wheel_member, wheel_path

TINY_CFG = """[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
filters=18
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,14, 23,27, 37,58
classes=1
"""
TINY_FLOATS = (8 + 8 * 3 + 8 * 3 * 9) + (18 + 18 * 8)


def _weights(n_floats: int, seed: int = 0) -> bytes:
    header = np.array([0, 2, 5], "<i4").tobytes() + np.zeros(1, "<i8").tobytes()
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, n_floats).astype("<f4")
    w[8 * 3 : 8 * 4] = np.abs(w[8 * 3 : 8 * 4]) + 0.1  # bn variances must be positive
    return header + w.tobytes()


@pytest.mark.parametrize(
    "text,reason",
    [
        pytest.param("[convolutional]\nfilters=1\n", "cfg-syntax", id="no-net-section"),
        pytest.param("[net]\nwidth=32\n", "cfg-syntax", id="no-layers"),
        pytest.param("[net]\nwidth=32\n[lstm]\n", "cfg-unsupported-layer", id="unknown-layer"),
        pytest.param("width=32\n", "cfg-syntax", id="key-before-section"),
        pytest.param("[net]\nwidth 32\n[yolo]\n", "cfg-syntax", id="line-without-equals"),
    ],
)
def test_bad_cfg_is_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(ConversionError) as exc:
        parse_cfg(text)
    assert exc.value.reason == reason
    assert "cfg" in str(exc.value)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]=#,\n abcnetyolo0123456789")), max_size=200))
def test_parse_cfg_raises_only_conversion_errors(text: str) -> None:
    try:
        sections = parse_cfg(text)
    except ConversionError:
        return
    assert sections[0].type == "net" and len(sections) > 1


def test_tiny_network_matches_the_numpy_reference() -> None:
    weights = _weights(TINY_FLOATS)
    model, heads = build_onnx(TINY_CFG, weights)
    assert [h.stride for h in heads] == [2] and heads[0].anchors == [[10, 14], [23, 27], [37, 58]]
    x = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"images": x})
    (want,) = forward(TINY_CFG, weights, x[0])
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("delta,reason", [pytest.param(-1, "weights-truncated", id="one-float-short"), pytest.param(3, "weights-mismatch", id="three-floats-extra")])
def test_weights_that_do_not_match_the_cfg_are_refused(delta: int, reason: str) -> None:
    with pytest.raises(ConversionError) as exc:
        build_onnx(TINY_CFG, _weights(TINY_FLOATS + delta))
    assert exc.value.reason == reason
    assert "do not match the cfg" in str(exc.value)


def test_yolov4_tiny_conversion_matches_the_reference_on_bus_jpg(cache_dir, detector, media) -> None:
    """The converted model and an independent numpy forward pass agree on a real image."""
    import cv2

    src = KNOWN_MODELS["yolov4-tiny"]
    whl = wheel_path(cache_dir)
    cfg = read_wheel_member(whl, src.cfg).decode()
    weights = read_wheel_member(whl, src.weights)
    batch, _ = detector.preprocess([cv2.imread(str(media["bus.jpg"]))])
    got = detector.infer(batch)
    want = forward(cfg, weights, batch[0])
    assert [g.shape[1:] for g in got] == [w.shape for w in want] == [(255, 13, 13), (255, 26, 26)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[0], w, rtol=1e-3, atol=2e-3)

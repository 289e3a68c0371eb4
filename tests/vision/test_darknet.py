"""The Darknet -> ONNX converter: cfg parsing, weight accounting, and numerical agreement with
two references: our numpy forward pass, and OpenCV 4's Darknet importer (OpenCV 5 removed it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


OPENCV4 = "opencv-python-headless==4.10.0.84"  # the last OpenCV line that still reads Darknet files
_CV4_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import cv2, numpy as np
assert cv2.__version__.startswith("4."), cv2.__version__
net = cv2.dnn.readNetFromDarknet(sys.argv[2], sys.argv[3])
net.setInput(np.load(sys.argv[4]))
a, b = net.forward(["conv_29", "conv_36"])  # the raw convolutions feeding yolo_30 and yolo_37
np.savez(sys.argv[5], head0=a, head1=b)
"""


@pytest.fixture(scope="session")
def opencv4(cache_dir) -> Path:
    """OpenCV 4 from PyPI, installed once into the cache beside (not into) the project's OpenCV 5."""
    target = cache_dir / "opencv4-4.10.0.84"
    if not (target / "cv2").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", "--target", str(target), OPENCV4], check=True, timeout=900)
    return target


def test_conversion_matches_opencv4_darknet_importer(cache_dir, detector, media, opencv4, tmp_path) -> None:
    """OpenCV 4's own Darknet reader, run in a child process, gives the same raw heads on bus.jpg."""
    import cv2

    src = KNOWN_MODELS["yolov4-tiny"]
    whl = wheel_path(cache_dir)
    (tmp_path / "net.cfg").write_bytes(read_wheel_member(whl, src.cfg))
    (tmp_path / "net.weights").write_bytes(read_wheel_member(whl, src.weights))
    batch, _ = detector.preprocess([cv2.imread(str(media["bus.jpg"]))])
    np.save(tmp_path / "input.npy", batch)
    subprocess.run(
        [sys.executable, "-c", _CV4_SCRIPT, str(opencv4), str(tmp_path / "net.cfg"), str(tmp_path / "net.weights"), str(tmp_path / "input.npy"), str(tmp_path / "cv.npz")],
        check=True,
        timeout=120,
    )
    ref = np.load(tmp_path / "cv.npz")
    ours = detector.infer(batch)
    np.testing.assert_allclose(ours[0], ref["head0"], atol=2e-3)
    np.testing.assert_allclose(ours[1], ref["head1"], atol=2e-3)

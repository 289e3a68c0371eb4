"""Static int8 quantization of a model package for ARM nodes, and how much it changes answers.

ONNX Runtime's ``quantize_static`` (QDQ format, per-channel weights, MinMax calibration) is fed
real frames, letterboxed exactly as the detector does it, so activation ranges match what a shop
camera produces. The result is a new package (``precision: int8``) whose provenance names the
source package sha256 and the calibration clip.

``agreement`` compares the int8 and fp32 detectors on the same frames: a detection agrees when
the other model has a box of the same class with IoU >= 0.5. The F1 of that matching is reported
next to both speeds, because an int8 model that is fast but misses shoppers is no gain.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from vision.boxes import box_iou
from vision.detector import OnnxDetector
from vision.errors import SourceUnavailable
from vision.model import ModelPackage, write_package
from vision.types import Detections, Frame

log = logging.getLogger(__name__)


def read_frames(video: str | Path, count: int, step: int = 1) -> list[np.ndarray]:
    """Return up to ``count`` BGR frames from a video, taking every ``step``-th."""
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise SourceUnavailable("open-failed", f"cannot open calibration video {video}; pass --calibration with a readable video")
    frames: list[np.ndarray] = []
    i = 0
    while len(frames) < count:
        ok, img = cap.read()
        if not ok:
            break
        if i % step == 0:
            frames.append(img)
        i += 1
    cap.release()
    if not frames:
        raise SourceUnavailable("no-frames", f"calibration video {video} yielded no frames")
    return frames


class _Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type hints
    def __init__(self, detector: OnnxDetector, frames: list[np.ndarray]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter({detector.manifest.input_name: detector.preprocess([f])[0]} for f in frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_package(src: ModelPackage, dest: Path, frames: list[np.ndarray], calibration_name: str) -> ModelPackage:
    """Write an int8 copy of ``src`` into ``dest``, calibrated on ``frames``."""
    fp32 = OnnxDetector(src, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(src.onnx_path), str(pre), skip_symbolic_shape=True)
        log.info("calibrating int8 on %d frames of %s", len(frames), calibration_name)
        quantize_static(
            str(pre),
            str(out),
            _Reader(fp32, frames),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        model = onnx.load(str(out))
    m = src.manifest
    fields = m.model_dump(exclude={"sha256"})
    fields.update(
        version=m.version.replace("fp32", "int8") if "fp32" in m.version else f"{m.version}-int8",
        precision="int8",
        provenance={
            **m.provenance,
            "quantized_from_sha256": m.sha256,
            "quantization": "onnxruntime quantize_static QDQ, per-channel int8 weights, uint8 activations, MinMax",
            "calibration": f"{len(frames)} frames of {calibration_name}",
        },
    )
    return write_package(dest, model, fields)


def match_f1(a: list[Detections], b: list[Detections], iou: float = 0.5) -> float:
    """Return the F1 of greedy same-class IoU matching between two runs over the same frames."""
    tp = na = nb = 0
    for da, db in zip(a, b, strict=True):
        na += len(da)
        nb += len(db)
        if not len(da) or not len(db):
            continue
        m = box_iou(da.xyxy, db.xyxy) * (da.class_ids[:, None] == db.class_ids[None, :])
        while m.size and m.max() >= iou:
            i, j = np.unravel_index(int(m.argmax()), m.shape)
            tp += 1
            m[i, :] = 0
            m[:, j] = 0
    return 1.0 if na + nb == 0 else 2 * tp / (na + nb)


def compare(fp32: ModelPackage, int8: ModelPackage, frames: list[np.ndarray], threads: int = 0) -> dict[str, float]:
    """Return fps of both packages on ``frames`` (one at a time) and their detection agreement."""
    out: dict[str, float] = {}
    results = {}
    for name, pkg in (("fp32", fp32), ("int8", int8)):
        det = OnnxDetector(pkg, threads=threads)
        fr = [Frame(f, "calibration", i, float(i)) for i, f in enumerate(frames)]
        det.detect(fr[:1])  # warm-up: first run allocates
        t = time.perf_counter()
        results[name] = [det.detect([f])[0] for f in fr]
        out[f"{name}_fps"] = round(len(fr) / (time.perf_counter() - t), 2)
    out["speedup"] = round(out["int8_fps"] / out["fp32_fps"], 3)
    out["agreement_f1"] = round(match_f1(results["fp32"], results["int8"]), 4)
    return out

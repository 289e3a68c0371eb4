"""Object detection: the ``Detector`` protocol and its ONNX Runtime implementation.

Pre- and post-processing are pure numpy functions (``letterbox``, ``decode_heads``, ``nms``) so
they can be tested and property-tested without a model; ``OnnxDetector`` only owns the session.
It takes a list of frames and runs them as one batch, so a GPU node serving many cameras pays
one inference call per round, not one per camera.

Execution providers are chosen from what this onnxruntime build offers, in the order a shop
node benefits from them (TensorRT, CUDA, OpenVINO, CoreML, then CPU), narrowed by what the
configuration allows; CPU is always the last resort so a missing GPU driver degrades speed, not
availability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import onnxruntime as ort

from vision.boxes import box_iou
from vision.model import Manifest as ModelManifest
from vision.model import ModelPackage
from vision.types import Detections, Frame

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "CPUExecutionProvider",
)
PROVIDER_ALIASES = {"tensorrt": PROVIDER_PREFERENCE[0], "cuda": PROVIDER_PREFERENCE[1], "openvino": PROVIDER_PREFERENCE[2], "coreml": PROVIDER_PREFERENCE[3], "cpu": PROVIDER_PREFERENCE[4]}


class Detector(Protocol):
    """Anything that turns a batch of frames into one Detections per frame."""

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        """Return the detections of each frame, in order."""
        ...


class StagedDetector(Detector, Protocol):
    """A detector whose stages can be timed apart; what ``vision.pipeline`` runs."""

    manifest: ModelManifest

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """Return the input batch for BGR images and each image's letterbox mapping."""
        ...

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the network on a prepared batch and return its raw outputs."""
        ...

    def postprocess(self, raw: list[np.ndarray], index: int, lb: Letterbox, width: int, height: int) -> Detections:
        """Turn one image's raw outputs into Detections in its own pixels."""
        ...


def choose_providers(available: Sequence[str], wanted: Sequence[str] | None = None) -> list[str]:
    """Return the providers to use: the wanted ones (aliases allowed) that exist, best first, CPU last."""
    allowed = set(PROVIDER_PREFERENCE) if not wanted else {PROVIDER_ALIASES.get(w.lower(), w) for w in wanted}
    unknown = allowed - set(PROVIDER_PREFERENCE)
    if unknown:
        raise ValueError(f"unknown execution provider(s) {sorted(unknown)}; choose from {sorted(PROVIDER_ALIASES)}")
    chosen = [p for p in PROVIDER_PREFERENCE if p in allowed and p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the network input: ``scale`` then shift by ``(pad_x, pad_y)``."""

    scale: float
    pad_x: float
    pad_y: float


def letterbox(image: np.ndarray, width: int, height: int, pad_value: int = 127) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad to (height, width); return the image and the mapping."""
    h, w = image.shape[:2]
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else image
    px, py = (width - nw) // 2, (height - nh) // 2
    out = np.full((height, width, 3), pad_value, dtype=np.uint8)
    out[py : py + nh, px : px + nw] = resized
    return out, Letterbox(scale, px, py)


def unletterbox(xyxy: np.ndarray, lb: Letterbox, width: int, height: int) -> np.ndarray:
    """Map boxes from network input pixels back to the original image, clipped to it."""
    out = xyxy.copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - lb.pad_x) / lb.scale
    out[:, [1, 3]] = (out[:, [1, 3]] - lb.pad_y) / lb.scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


@dataclass(frozen=True)
class HeadSpec:
    """Decoding parameters of one YOLO output."""

    anchors: np.ndarray  # (A, 2) in input pixels
    stride: int
    scale_x_y: float


def decode_heads(raw: Sequence[np.ndarray], heads: Sequence[HeadSpec], score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's raw YOLO outputs (each (A*(5+C), H, W)) into xyxy, scores, class ids above the threshold."""
    boxes, scores, classes = [], [], []
    for out, spec in zip(raw, heads, strict=True):
        a = len(spec.anchors)
        _, gh, gw = out.shape
        t = out.reshape(a, -1, gh, gw)  # (A, 5+C, H, W)
        obj = _sigmoid(t[:, 4])
        cand = obj > score_threshold  # objectness bounds the score from above: a cheap prefilter
        if not cand.any():
            continue
        ai, gy, gx = np.nonzero(cand)
        v = t[ai, :, gy, gx]  # (K, 5+C)
        cls_p = _sigmoid(v[:, 5:]) * obj[ai, gy, gx][:, None]
        cid = cls_p.argmax(axis=1)
        sc = cls_p[np.arange(len(cid)), cid]
        keep = sc > score_threshold
        if not keep.any():
            continue
        v, ai, gx, gy, cid, sc = v[keep], ai[keep], gx[keep], gy[keep], cid[keep], sc[keep]
        s = spec.scale_x_y
        cx = (_sigmoid(v[:, 0]) * s - (s - 1) / 2 + gx) * spec.stride
        cy = (_sigmoid(v[:, 1]) * s - (s - 1) / 2 + gy) * spec.stride
        bw = np.exp(np.clip(v[:, 2], -10, 10)) * spec.anchors[ai, 0]
        bh = np.exp(np.clip(v[:, 3], -10, 10)) * spec.anchors[ai, 1]
        boxes.append(np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1))
        scores.append(sc)
        classes.append(cid)
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(boxes).astype(np.float32), np.concatenate(scores).astype(np.float32), np.concatenate(classes).astype(np.int64)


def nms(xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float, max_det: int = 300) -> np.ndarray:
    """Return indices kept by class-aware greedy NMS, highest score first."""
    if len(scores) == 0:
        return np.zeros((0,), np.int64)
    # Offsetting each class into its own region of the plane makes one NMS pass class-aware.
    offset = class_ids.astype(np.float64)[:, None] * (float(np.abs(xyxy).max()) + 1.0) * 2
    boxes = xyxy.astype(np.float64) + offset
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size and len(keep) < max_det:
        i = order[0]
        keep.append(int(i))
        if order.size == 1:
            break
        ious = box_iou(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return np.array(keep, dtype=np.int64)


class OnnxDetector:
    """YOLO detector on ONNX Runtime; ``detect`` runs all given frames as one batch."""

    def __init__(
        self,
        package: ModelPackage,
        *,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        score_threshold: float | None = None,
        nms_iou: float | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        m = package.manifest
        self.manifest = m
        self.score_threshold = m.thresholds.score if score_threshold is None else score_threshold
        self.nms_iou = m.thresholds.nms_iou if nms_iou is None else nms_iou
        if classes:
            unknown = [c for c in classes if c not in m.labels]
            if unknown:
                raise ValueError(f"classes {unknown} are not labels of model {m.name}; see its model.json")
        self.class_ids = frozenset(m.labels.index(c) for c in classes) if classes else None
        opts = ort.SessionOptions()
        # threads=0 lets ONNX Runtime use every core; on a shared node set it to the cores the pipeline owns.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # Idle ONNX Runtime workers spin by default; that saves a little latency per run but burns
        # the cores the capture thread (decoding) and the tracker need between runs.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.providers = choose_providers(ort.get_available_providers(), providers)
        self.session = ort.InferenceSession(str(package.onnx_path), sess_options=opts, providers=self.providers)
        self.heads = [HeadSpec(np.array(h.anchors, np.float64), h.stride, h.scale_x_y) for h in m.heads]
        self.output_names = [h.output for h in m.heads]
        log.info("detector %s %s on %s, %d threads", m.name, m.precision, self.session.get_providers(), threads)

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        """Return the NCHW float batch for BGR images and each image's letterbox mapping."""
        m = self.manifest
        p = m.preprocessing
        batch = np.empty((len(images), 3, m.input_height, m.input_width), np.float32)
        lbs = []
        for i, img in enumerate(images):
            boxed, lb = letterbox(img, m.input_width, m.input_height, p.pad_value)
            if p.color == "RGB":
                boxed = boxed[:, :, ::-1]
            batch[i] = boxed.transpose(2, 0, 1)
            lbs.append(lb)
        batch *= p.scale
        return batch, lbs

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run the network on a prepared batch and return its raw head outputs."""
        outputs: list[np.ndarray] = self.session.run(self.output_names, {self.manifest.input_name: batch})
        return outputs

    def postprocess(self, raw: list[np.ndarray], index: int, lb: Letterbox, width: int, height: int) -> Detections:
        """Decode, filter by class, run NMS and map one image's outputs to Detections."""
        xyxy, scores, cids = decode_heads([r[index] for r in raw], self.heads, self.score_threshold)
        if self.class_ids is not None and len(cids):
            sel = np.isin(cids, list(self.class_ids))
            xyxy, scores, cids = xyxy[sel], scores[sel], cids[sel]
        keep = nms(xyxy, scores, cids, self.nms_iou)
        return Detections(unletterbox(xyxy[keep], lb, width, height), scores[keep], cids[keep])

    def detect(self, frames: Sequence[Frame]) -> list[Detections]:
        """Return the detections of each frame, running them as one batch."""
        if not frames:
            return []
        batch, lbs = self.preprocess([f.image for f in frames])
        raw = self.infer(batch)
        return [self.postprocess(raw, i, lb, f.width, f.height) for i, (f, lb) in enumerate(zip(frames, lbs, strict=True))]

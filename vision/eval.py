"""Measure tracker quality on MOTChallenge ground truth with controlled detector noise.

The tracker is fed detections derived from ground truth: a share of boxes dropped (missed
detections, occlusions), the rest jittered (localisation noise), plus spurious boxes (false
positives) — each knob separately, from a seeded generator, so a change to the tracker can be
judged on the same input. Scoring is motmetrics' MOTA, IDF1 and id switches. The IoU distance
matrix is computed here (motmetrics 1.4's own helper calls ``np.asfarray``, gone in NumPy 2).

``parse_mot`` is the parser of the MOTChallenge text format; it names the line of a bad row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vision.boxes import box_iou
from vision.tracker import ByteTracker, TrackerConfig
from vision.types import Detections


class MotFormatError(ValueError):
    """A MOTChallenge file line is malformed."""


@dataclass(frozen=True)
class GroundTruth:
    """Rows of a MOTChallenge gt file: frame, id, and xyxy box per row."""

    frames: np.ndarray
    ids: np.ndarray
    xyxy: np.ndarray


def parse_mot(text: str, source: str = "gt") -> GroundTruth:
    """Parse MOTChallenge rows 'frame,id,x,y,w,h[,...]' (1-based frames) into arrays."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6:
            raise MotFormatError(f"{source} line {lineno}: expected at least 6 comma-separated fields (frame,id,x,y,w,h), got {len(parts)}")
        try:
            frame, tid = int(float(parts[0])), int(float(parts[1]))
            x, y, w, h = (float(p) for p in parts[2:6])
        except ValueError:
            raise MotFormatError(f"{source} line {lineno}: fields must be numbers, got {line.strip()[:60]!r}") from None
        if frame < 1 or w <= 0 or h <= 0 or not np.isfinite([x, y, w, h]).all():
            raise MotFormatError(f"{source} line {lineno}: frame must be >= 1 and the box finite with positive size")
        if len(parts) >= 7 and parts[6] not in ("", "1", "-1") and float(parts[6]) == 0:
            continue  # MOT convention: conf 0 marks rows to ignore
        rows.append((frame, tid, x, y, x + w, y + h))
    if not rows:
        raise MotFormatError(f"{source}: no ground-truth rows")
    a = np.array(rows, dtype=np.float64)
    return GroundTruth(a[:, 0].astype(np.int64), a[:, 1].astype(np.int64), a[:, 2:6])


def noisy_detections(boxes: np.ndarray, rng: np.random.Generator, drop: float, jitter: float, false_positives: float, frame_size: tuple[float, float]) -> Detections:
    """Return detections from true boxes: drop a share, jitter by a fraction of size, add spurious ones."""
    keep = rng.random(len(boxes)) >= drop
    b = boxes[keep].copy()
    if len(b) and jitter > 0:
        wh = b[:, 2:] - b[:, :2]
        b += rng.normal(0, jitter, b.shape) * np.c_[wh, wh]
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
    scores = rng.uniform(0.55, 0.95, len(b))
    n_fp = rng.poisson(false_positives) if false_positives > 0 else 0
    if n_fp:
        w, h = frame_size
        size = rng.uniform(20, 120, (n_fp, 2)) * np.array([0.5, 1.0])
        xy = rng.uniform(0, 1, (n_fp, 2)) * np.array([w, h])
        fp = np.c_[xy, xy + size]
        b = np.r_[b, fp]
        scores = np.r_[scores, rng.uniform(0.1, 0.7, n_fp)]
    return Detections(b.astype(np.float32), scores.astype(np.float32), np.zeros(len(b), np.int64))


def evaluate(gt: GroundTruth, *, drop: float = 0.0, jitter: float = 0.0, false_positives: float = 0.0, seed: int = 0, config: TrackerConfig | None = None) -> dict[str, float | int]:
    """Run the tracker over noisy detections of ``gt`` and return MOTA, IDF1 and id switches."""
    import motmetrics as mm  # a dev dependency: only evaluation needs it

    rng = np.random.default_rng(seed)
    tracker = ByteTracker(config)
    acc = mm.MOTAccumulator(auto_id=True)
    frame_size = (float(gt.xyxy[:, 2].max()), float(gt.xyxy[:, 3].max()))
    for f in range(1, int(gt.frames.max()) + 1):
        sel = gt.frames == f
        dets = noisy_detections(gt.xyxy[sel], rng, drop, jitter, false_positives, frame_size)
        tracks = tracker.update(dets, ts=float(f))
        dist = 1.0 - box_iou(gt.xyxy[sel], tracks.xyxy)
        dist[dist > 0.5] = np.nan  # motmetrics: NaN = may not be matched (IoU below 0.5)
        acc.update(gt.ids[sel].tolist(), tracks.ids.tolist(), dist)
    mh = mm.metrics.create()
    s = mh.compute(acc, metrics=["mota", "idf1", "num_switches", "num_frames", "num_unique_objects"], name="x")
    return {
        "mota": round(float(s["mota"].iloc[0]), 4),
        "idf1": round(float(s["idf1"].iloc[0]), 4),
        "id_switches": int(s["num_switches"].iloc[0]),
        "frames": int(s["num_frames"].iloc[0]),
        "objects": int(s["num_unique_objects"].iloc[0]),
    }


def load_gt(path: str | Path) -> GroundTruth:
    """Read and parse a MOTChallenge gt file."""
    p = Path(path)
    return parse_mot(p.read_text(), str(p))

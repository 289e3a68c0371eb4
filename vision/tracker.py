"""Multi-object tracking in the ByteTrack family, on numpy and scipy only.

Why ByteTrack: it keeps low-score detections for a second association round, which is what
holds a shopper's id when they are half hidden behind a shelf or another shopper; the PyPI
packages that implement it drag in torch, lap or cython_bbox. This one is ~200 lines: a
constant-velocity Kalman filter per track (state cx, cy, w, h and their velocities), IoU cost,
``scipy.optimize.linear_sum_assignment`` for matching.

Per frame (``update``):
1. predict every live track;
2. match high-score detections to tracked + recently lost tracks;
3. match low-score detections to the tracked ones still unmatched (occlusion rescue);
4. match leftover high detections to tentative tracks (seen once); drop unmatched tentatives;
5. tracks unmatched for more than ``max_lost_frames`` end; leftover high detections start tracks.
Ids are never reused, so a downstream consumer can key state on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vision.boxes import box_iou
from vision.types import Detections, Tracks


class TrackerConfig(BaseModel):
    """Tuning of the tracker; each value trades responsiveness against stability."""

    model_config = ConfigDict(extra="forbid")
    high_score: float = Field(0.5, gt=0, lt=1, description="detections at or above this score are matched first and may start tracks; lower it to pick up faint people, at the cost of more false tracks")
    low_score: float = Field(0.1, ge=0, lt=1, description="detections between this and high_score only extend existing tracks (ByteTrack's second round)")
    new_track_score: float = Field(0.6, gt=0, le=1, description="minimum score to start a new track; higher means fewer ghost ids from spurious boxes")
    match_iou: float = Field(0.2, gt=0, lt=1, description="minimum IoU for a first-round match; lower tolerates faster motion but risks id swaps")
    low_match_iou: float = Field(0.5, gt=0, lt=1, description="minimum IoU to match a low-score detection")
    max_lost_frames: int = Field(30, ge=0, description="frames a track survives without a match; raising it bridges longer occlusions but keeps ghosts longer")
    min_hits: int = Field(2, ge=1, description="matches needed before a track is reported; 1 reports every new box at once")


@dataclass
class _Track:
    id: int
    mean: np.ndarray  # (8,) cx, cy, w, h, vcx, vcy, vw, vh
    cov: np.ndarray  # (8, 8)
    score: float
    hits: int = 1
    lost: int = 0

    def xyxy(self) -> np.ndarray:
        cx, cy, w, h = self.mean[:4]
        w, h = max(w, 1.0), max(h, 1.0)
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


_F = np.eye(8)
_F[:4, 4:] = np.eye(4)
_H = np.eye(4, 8)
_POS_STD = 1 / 20  # measurement and process noise scale with box height, as in ByteTrack
_VEL_STD = 1 / 160


def _to_cxcywh(b: np.ndarray) -> np.ndarray:
    return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]], dtype=np.float64)


def _initiate(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.r_[z, np.zeros(4)]
    s = np.r_[[2 * _POS_STD * z[3]] * 4, [10 * _VEL_STD * z[3]] * 4]
    return mean, np.diag(s**2)


def _predict(mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = mean[3]
    q = np.diag(np.r_[[_POS_STD * h] * 4, [_VEL_STD * h] * 4] ** 2)
    return _F @ mean, _F @ cov @ _F.T + q


def _update(mean: np.ndarray, cov: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.diag(np.array([_POS_STD * mean[3]] * 4) ** 2)
    s = _H @ cov @ _H.T + r
    k = np.linalg.solve(s, (cov @ _H.T).T).T
    mean = mean + k @ (z - _H @ mean)
    cov = cov - k @ s @ k.T
    return mean, cov


def _match(tracks: list[_Track], boxes: np.ndarray, min_iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Return (track index, box index) matches and the unmatched indices of each side."""
    if not tracks or len(boxes) == 0:
        return [], list(range(len(tracks))), list(range(len(boxes)))
    # Imported here: scipy.optimize costs ~0.7 s to import, and agent configs import this module
    # (for TrackerConfig) on nodes that may run no camera at all.
    from scipy.optimize import linear_sum_assignment

    iou = box_iou(np.stack([t.xyxy() for t in tracks]), boxes)
    rows, cols = linear_sum_assignment(-iou)
    pairs = [(r, c) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]
    mt, mb = {r for r, _ in pairs}, {c for _, c in pairs}
    return pairs, [i for i in range(len(tracks)) if i not in mt], [j for j in range(len(boxes)) if j not in mb]


class ByteTracker:
    """Assign stable ids to detections frame by frame; one instance per camera."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        import scipy.optimize  # noqa: F401 - pay the import here, not inside the first frame's timing
        self._tracks: list[_Track] = []  # confirmed (hits >= min_hits at some point)
        self._tentative: list[_Track] = []
        self._next_id = 1
        self.frame_index = 0

    def _new(self, z: np.ndarray, score: float) -> _Track:
        mean, cov = _initiate(z)
        t = _Track(self._next_id, mean, cov, score)
        self._next_id += 1
        return t

    def update(self, dets: Detections, ts: float = 0.0) -> Tracks:
        """Feed one frame's detections and return the confirmed tracks visible in it."""
        cfg = self.config
        self.frame_index += 1
        for t in self._tracks + self._tentative:
            t.mean, t.cov = _predict(t.mean, t.cov)
        high = dets.scores >= cfg.high_score
        low = (dets.scores >= cfg.low_score) & ~high
        hb, hs = dets.xyxy[high], dets.scores[high]
        lb, ls = dets.xyxy[low], dets.scores[low]

        def hit(t: _Track, box: np.ndarray, score: float) -> None:
            t.mean, t.cov = _update(t.mean, t.cov, _to_cxcywh(box))
            t.score, t.hits, t.lost = float(score), t.hits + 1, 0

        pool = self._tracks
        pairs, un_t, un_h = _match(pool, hb, cfg.match_iou)
        for ti, bi in pairs:
            hit(pool[ti], hb[bi], hs[bi])
        rest = [pool[i] for i in un_t if pool[i].lost == 0]  # only tracks seen last frame get the low round
        pairs2, _un_r, _ = _match(rest, lb, cfg.low_match_iou)
        for ti, bi in pairs2:
            hit(rest[ti], lb[bi], ls[bi])
        matched_ids = {pool[ti].id for ti, _ in pairs} | {rest[ti].id for ti, _ in pairs2}
        for t in pool:
            if t.id not in matched_ids:
                t.lost += 1

        left = hb[un_h]
        left_s = hs[un_h]
        pairs3, _un_tent, un_left = _match(self._tentative, left, cfg.match_iou)
        promoted = []
        for ti, bi in pairs3:
            t = self._tentative[ti]
            hit(t, left[bi], left_s[bi])
            promoted.append(t)
        kept_tent = [t for t in promoted if t.hits < cfg.min_hits]
        self._tracks.extend(t for t in promoted if t.hits >= cfg.min_hits)
        for bi in un_left:
            if left_s[bi] >= cfg.new_track_score:
                t = self._new(_to_cxcywh(left[bi]), float(left_s[bi]))
                (self._tracks if cfg.min_hits <= 1 else kept_tent).append(t)
        self._tentative = kept_tent

        ended = tuple(t.id for t in self._tracks if t.lost > cfg.max_lost_frames)
        self._tracks = [t for t in self._tracks if t.lost <= cfg.max_lost_frames]
        visible = [t for t in self._tracks if t.lost == 0]
        if not visible:
            return Tracks(np.zeros((0,), np.int64), np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), self.frame_index, ts, ended)
        return Tracks(
            np.array([t.id for t in visible], np.int64),
            np.stack([t.xyxy() for t in visible]).astype(np.float32),
            np.array([t.score for t in visible], np.float32),
            self.frame_index,
            ts,
            ended,
        )

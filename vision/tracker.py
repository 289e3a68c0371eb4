"""Multi-object tracking in the ByteTrack family, on numpy and scipy only.

Why ByteTrack: it keeps low-score detections for a second association round, which is what
holds a shopper's id when they are half hidden behind a shelf or another shopper; the PyPI
packages that implement it drag in torch, lap or cython_bbox. This one is ~300 lines: a
constant-velocity Kalman filter per track (state cx, cy, w, h and their velocities), IoU cost,
``scipy.optimize.linear_sum_assignment`` for matching.

Per frame (``update``):
1. predict every live track (a lost track keeps coasting on its Kalman prediction), by as many
   ``frame_s`` steps as the timestamps say passed since the previous frame (at least one, so a
   camera at 10 fps or faster steps once per frame; a 3 fps camera 3.3 steps);
2. match high-score detections to tracked + lost tracks (predicted boxes); with ``slow_gate`` on
   (off by default), frames further apart than ``frame_s`` then match the tracks seen in the
   previous frame to leftover high-score boxes by centre distance;
3. match low-score detections to the tracks seen in the previous frame (ByteTrack's occlusion
   rescue, tight gate);
4. recovery, in the spirit of OC-SORT's observation-centric recovery: every track still
   unmatched, lost ones included, gets a looser gate on the low-score detections still free,
   scored by the better of the IoU with its predicted box and with its last *observed* box (the
   prediction drifts while a track is lost; where the person was last seen does not), among
   boxes of about its size. A shopper hidden by a neighbour at a shelf is mostly detected weakly
   and off-centre, or missed for a frame, which the tight round alone turned into a new id. A
   track lost for more than ``_RECOVER_CONFIRM`` (5) frames and found this way is reported only
   from its next match: after a long loss one weak box where the person was lost is as likely
   spurious (under a camera grid, a box only one view saw, which the merge scores down), and
   reported it put a blacked-out shopper back at the place they were lost, where fusion then
   refused the real shopper found elsewhere;
5. match leftover high detections to tentative tracks (seen once); drop unmatched tentatives;
6. tracks unmatched for more than ``max_lost_frames`` end; leftover high detections start tracks.

With ``report_lost_frames`` > 0, a confirmed track lost for at most that many frames is still
reported, at its predicted box, with ``Tracks.predicted`` set: a shopper hidden for a few frames
by a neighbour is still standing there. Off by default: a consumer must weigh a predicted
position below an observed one, and fusion does not yet (measured: at 3 fps a second of
predicted positions kept a lost shopper "seen" and blocked re-joining their new id). Zone events
ignore predicted positions (vision/events.py). Ids are never reused, so a downstream consumer can
key state on them.
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
    recover_iou: float = Field(0.4, ge=0, lt=1, description="minimum IoU, with the predicted or the last observed box, for the recovery round that gives a free low-score detection of about the same size to a track still unmatched, lost ones included; lower re-finds people after longer occlusions but risks taking a newcomer for them; 0 turns the round off")
    max_lost_frames: int = Field(30, ge=0, description="frames a track survives without a match; raising it bridges longer occlusions but keeps ghosts longer")
    report_lost_frames: int = Field(0, ge=0, description="frames a lost track is still reported, at its predicted box and marked Tracks.predicted (a shopper hidden for a moment by a neighbour); 0 reports only tracks matched in the frame. Raise it only for consumers that read Tracks.predicted: one that takes a predicted box for a sighting is misled (fusion's re-joining is, at 3 fps)")
    min_hits: int = Field(2, ge=1, description="matches needed before a track is reported; 1 reports every new box at once")
    slow_gate: float = Field(0.0, ge=0, description="frames further apart than frame_s: a track seen in the previous frame and matched by no box in the first round takes a free high-score box of about its size whose centre is within this many box heights of its predicted centre per frame_s step (IoU fails when people move far between frames); 0 (the default) turns it off. Never used at or above 1 / frame_s fps. Off because, measured at 3 fps (docs/benchmarks.md, tracker round slow-camera), 0.25 halved the remaining track fragments but changed no cart and tripled the id swaps fusion found under the camera grid")
    frame_s: float = Field(0.1, ge=0, description="frame interval, in seconds, the motion model's per-frame steps and noise are stated for; frames further apart than this (by the timestamps given to update) are predicted as that many steps, so a slow camera's tracks keep up with people who moved far between frames; frames closer together are predicted as one step, as before. 0: count frames, ignore timestamps")


@dataclass
class _Track:
    id: int
    mean: np.ndarray  # (8,) cx, cy, w, h, vcx, vcy, vw, vh
    cov: np.ndarray  # (8, 8)
    score: float
    last_z: np.ndarray  # (4,) cx, cy, w, h of the last matched detection
    hits: int = 1
    lost: int = 0  # frames missed in a row, up to the previous frame until this frame's matching is done
    matched_at: int = 0  # frame index of the last match
    unconfirmed: bool = False  # found again after a long loss by one weak box (_RECOVER_CONFIRM): not reported until its next match

    def xyxy(self) -> np.ndarray:
        cx, cy, w, h = self.mean[:4]
        w, h = max(w, 1.0), max(h, 1.0)
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

    def last_xyxy(self) -> np.ndarray:
        cx, cy, w, h = self.last_z
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


_POS_STD = 1 / 20  # measurement and process noise scale with box height, as in ByteTrack
_VEL_STD = 1 / 160
_Q_UNIT = np.array([_POS_STD] * 4 + [_VEL_STD] * 4)  # process noise std per box height
_DIAG = np.diag_indices(8)
_DIAG4 = np.diag_indices(4)
_MAX_STEPS = 10.0  # frames further apart than this many frame_s steps are predicted as one step (ByteTracker._steps)
_RECOVER_SIZE = 0.2  # recovery round: a box's height may differ from the track's last by this share (0.8x to 1.25x)
_RECOVER_CONFIRM = 5  # recovery round: a track lost for more than this many frames is reported only from its next match (ByteTracker._associate)


def _to_cxcywh(b: np.ndarray) -> np.ndarray:
    return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]], dtype=np.float64)


def _initiate(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = np.r_[z, np.zeros(4)]
    s = np.r_[[2 * _POS_STD * z[3]] * 4, [10 * _VEL_STD * z[3]] * 4]
    return mean, np.diag(s**2)


def _predict(mean: np.ndarray, cov: np.ndarray, steps: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    # F @ x and F P F^T + Q, written out: F adds each velocity (per step) times ``steps`` to its
    # position, and the process noise of ``steps`` steps is added (a random walk: its variance
    # grows linearly). Cheaper than the matrix products and np.r_/np.diag, which ran once per
    # track per frame and dominated the cost. steps 1 is the plain per-frame step.
    new = mean.copy()
    new[:4] += steps * mean[4:]
    fc = cov.copy()
    fc[:4] += steps * cov[4:]
    fcf = fc.copy()
    fcf[:, :4] += steps * fc[:, 4:]
    fcf[_DIAG] += steps * (_Q_UNIT * mean[3]) ** 2
    return new, fcf


def _update(mean: np.ndarray, cov: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # H selects the first four state components, so H P H^T and P H^T are slices of P.
    s = cov[:4, :4].copy()
    s[_DIAG4] += (_POS_STD * mean[3]) ** 2
    k = np.linalg.solve(s, cov[:4, :]).T  # = P H^T S^-1 (S and P symmetric)
    mean = mean + k @ (z - mean[:4])
    cov = cov - k @ s @ k.T
    return mean, cov


def _assign(iou: np.ndarray, min_iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Return (row, column) matches of an IoU matrix at or above ``min_iou`` and the unmatched indices of each side."""
    n_t, n_b = iou.shape
    if n_t == 0 or n_b == 0 or iou.max() < min_iou:  # nothing close enough: skip the solver
        return [], list(range(n_t)), list(range(n_b))
    # Imported here: scipy.optimize costs ~0.7 s to import, and agent configs import this module
    # (for TrackerConfig) on nodes that may run no camera at all.
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(-iou)
    pairs = [(r, c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True) if iou[r, c] >= min_iou]
    mt, mb = {r for r, _ in pairs}, {c for _, c in pairs}
    return pairs, [i for i in range(n_t) if i not in mt], [j for j in range(n_b) if j not in mb]


def _match(tracks: list[_Track], boxes: np.ndarray, min_iou: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Return (track index, box index) matches on the predicted boxes and the unmatched indices of each side."""
    if not tracks or len(boxes) == 0:
        return [], list(range(len(tracks))), list(range(len(boxes)))
    return _assign(box_iou(np.stack([t.xyxy() for t in tracks]), boxes), min_iou)


def _near(tracks: list[_Track], boxes: np.ndarray, gate: float) -> list[tuple[int, int]]:
    """Return (track index, box index) matches by centre distance to the predicted box, within ``gate`` box heights."""
    if not tracks or len(boxes) == 0:
        return []
    pred = np.stack([t.mean[:4] for t in tracks])
    centres = np.c_[(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2]
    h = np.maximum(pred[:, 3], 1.0)[:, None]
    d = np.linalg.norm(pred[:, None, :2] - centres[None, :, :], axis=2) / h
    ratio = (boxes[:, 3] - boxes[:, 1])[None, :] / h
    close = (d <= gate) & (ratio >= 1 - _RECOVER_SIZE) & (ratio <= 1 / (1 - _RECOVER_SIZE))
    return _assign(np.where(close, 1.0 - d / (gate + 1.0), 0.0), 1e-9)[0]


def _recover(tracks: list[_Track], boxes: np.ndarray, min_iou: float) -> list[tuple[int, int]]:
    """Return (track index, box index) matches by the better IoU with the predicted or the last observed box.

    A box whose height differs from the track's last observed one by more than ``_RECOVER_SIZE``
    is not that person: at this loose a gate, a spurious box or a neighbour's half-hidden one
    would otherwise take a lost id (measured on TUD-Campus with false positives: more id switches).
    """
    if not tracks or len(boxes) == 0 or min_iou <= 0:
        return []
    last = np.stack([t.last_xyxy() for t in tracks])
    iou = np.maximum(box_iou(np.stack([t.xyxy() for t in tracks]), boxes), box_iou(last, boxes))
    ratio = (boxes[:, 3] - boxes[:, 1])[None, :] / np.maximum(last[:, 3] - last[:, 1], 1.0)[:, None]
    iou[(ratio < 1 - _RECOVER_SIZE) | (ratio > 1 / (1 - _RECOVER_SIZE))] = 0.0
    return _assign(iou, min_iou)[0]


class ByteTracker:
    """Assign stable ids to detections frame by frame; one instance per camera."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        import scipy.optimize  # noqa: F401 - pay the import here, not inside the first frame's timing
        self._tracks: list[_Track] = []  # confirmed (hits >= min_hits at some point)
        self._tentative: list[_Track] = []
        self._next_id = 1
        self.frame_index = 0
        self._last_ts: float | None = None

    def _steps(self, ts: float) -> float:
        """Return how many ``frame_s`` steps the motion model takes to this frame: at least 1."""
        last, self._last_ts = self._last_ts, ts
        if last is None or self.config.frame_s <= 0:
            return 1.0
        steps = (ts - last) / self.config.frame_s
        # Up to a hair over one step (a 10 fps camera's timestamps, rounded) is one step. So is a
        # gap of _MAX_STEPS or more: a stall, not a frame rate (a constant velocity held that long
        # is a guess), or timestamps that count frames (vision.eval's MOTChallenge runs).
        return steps if 1.001 < steps < _MAX_STEPS else 1.0

    def _new(self, z: np.ndarray, score: float) -> _Track:
        mean, cov = _initiate(z)
        t = _Track(self._next_id, mean, cov, score, z, matched_at=self.frame_index)
        self._next_id += 1
        return t

    def _hit(self, t: _Track, box: np.ndarray, score: float) -> None:
        z = _to_cxcywh(box)
        t.mean, t.cov = _update(t.mean, t.cov, z)
        t.last_z = z
        t.score, t.hits, t.lost, t.matched_at = float(score), t.hits + 1, 0, self.frame_index
        t.unconfirmed = False

    def _associate(self, hb: np.ndarray, hs: np.ndarray, lb: np.ndarray, ls: np.ndarray, steps: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Match detections to confirmed tracks (rounds 2-4); return the high-score boxes left over, with their scores."""
        cfg = self.config
        pool = self._tracks
        pairs, un_t, un_h = _match(pool, hb, cfg.match_iou)
        for ti, bi in pairs:
            self._hit(pool[ti], hb[bi], hs[bi])
        if steps > 1.0 and cfg.slow_gate > 0 and un_t and un_h:
            # A slow camera: people moved far between frames, and the IoU with the prediction
            # falls below the gate while the box is near; match by centre distance instead.
            cand = [i for i in un_t if pool[i].lost == 0]
            near = _near([pool[i] for i in cand], hb[un_h], cfg.slow_gate * steps)
            for ti, bi in near:
                self._hit(pool[cand[ti]], hb[un_h[bi]], hs[un_h[bi]])
            taken_t, taken_b = {cand[ti] for ti, _ in near}, {un_h[bi] for _, bi in near}
            un_t, un_h = [i for i in un_t if i not in taken_t], [j for j in un_h if j not in taken_b]
        rest = [pool[i] for i in un_t if pool[i].lost == 0]  # tracks seen last frame get the low round first
        pairs2, _, un_l = _match(rest, lb, cfg.low_match_iou)
        for ti, bi in pairs2:
            self._hit(rest[ti], lb[bi], ls[bi])
        # Recovery: a shopper hidden by a neighbour is mostly detected weakly and off-centre, so
        # the low round's tight gate, on a prediction that drifts while the track is lost, misses
        # them; a looser gate, also against where they were last seen, finds them again. Only
        # low-score boxes: a confident leftover box is as likely a newcomer, and starts a track.
        missing = [pool[i] for i in un_t if pool[i].matched_at != self.frame_index]
        if missing and un_l:
            free_b, free_s = lb[un_l], ls[un_l]
            for ti, bi in _recover(missing, free_b, cfg.recover_iou):
                t = missing[ti]
                long_lost = t.lost > _RECOVER_CONFIRM
                self._hit(t, free_b[bi], free_s[bi])
                # Lost for long: one weak box near where the person was lost is as likely a spurious one
                # (under several views, a box only one camera saw). Reported from its next match.
                t.unconfirmed = long_lost
        return hb[un_h], hs[un_h]

    def update(self, dets: Detections, ts: float = 0.0) -> Tracks:
        """Feed one frame's detections and return the confirmed tracks visible in it (or lost for at most ``report_lost_frames``)."""
        cfg = self.config
        self.frame_index += 1
        steps = self._steps(ts)
        for t in self._tracks + self._tentative:
            t.mean, t.cov = _predict(t.mean, t.cov, steps)
        high = dets.scores >= cfg.high_score
        low = (dets.scores >= cfg.low_score) & ~high
        left, left_s = self._associate(dets.xyxy[high], dets.scores[high], dets.xyxy[low], dets.scores[low], steps)

        pairs3, _un_tent, un_left = _match(self._tentative, left, cfg.match_iou)
        promoted = []
        for ti, bi in pairs3:
            t = self._tentative[ti]
            self._hit(t, left[bi], left_s[bi])
            promoted.append(t)
        kept_tent = [t for t in promoted if t.hits < cfg.min_hits]
        self._tracks.extend(t for t in promoted if t.hits >= cfg.min_hits)
        for bi in un_left:
            if left_s[bi] >= cfg.new_track_score:
                t = self._new(_to_cxcywh(left[bi]), float(left_s[bi]))
                (self._tracks if cfg.min_hits <= 1 else kept_tent).append(t)
        self._tentative = kept_tent

        for t in self._tracks:
            if t.matched_at != self.frame_index:
                t.lost += 1
        ended = tuple(t.id for t in self._tracks if t.lost > cfg.max_lost_frames)
        self._tracks = [t for t in self._tracks if t.lost <= cfg.max_lost_frames]
        return self._report(ts, ended)

    def _report(self, ts: float, ended: tuple[int, ...]) -> Tracks:
        """Return the tracks matched in this frame and those lost for at most ``report_lost_frames``."""
        shown = [t for t in self._tracks if t.lost <= self.config.report_lost_frames and not t.unconfirmed]
        if not shown:
            return Tracks(np.zeros((0,), np.int64), np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), self.frame_index, ts, ended, np.zeros((0,), bool))
        return Tracks(
            np.array([t.id for t in shown], np.int64),
            np.stack([t.xyxy() for t in shown]).astype(np.float32),
            np.array([t.score for t in shown], np.float32),
            self.frame_index,
            ts,
            ended,
            np.array([t.lost > 0 for t in shown], bool),
        )

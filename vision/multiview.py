"""Several overlapping ceiling cameras, one set of people: detections merged on the floor plane.

A shop with a ceiling camera per square metre sees every point of its floor from several views
at different angles, so a shopper hidden from one view by a neighbour (two people close together
occlude each other in a view that sees them obliquely, much less straight below a camera) is
usually visible in another. Ground-plane multi-camera tracking, as commonly done in retail:

1. **project** (:func:`project`): each camera's detection boxes go to floor coordinates (metres,
   the shop layout's frame) through that camera's image-to-floor homography
   (:class:`FloorView`); the person's floor point is the box centre for a camera looking straight
   down, the bottom middle (the feet) for an oblique view (``anchor``);
2. **merge** (:func:`merge`): the same person seen by several views becomes one detection. Greedy
   by score: each detection joins the nearest merged detection within ``gate_m`` on the floor
   that has no detection of its own camera yet (a camera sees a person once, so two boxes of one
   view are two people) and, when both carry appearance vectors, looks like it (cosine
   similarity at least ``min_similarity``: two people passing closer than the gate stay two),
   else starts one. The merged floor point and box are the score-weighted
   means of its members', its appearance vector (if the views give them, e.g. from a re-id
   model) the score-weighted mean renormalized, its score the best member's. A detection seen by
   one view only where at least ``confirm_views`` views cover the floor (:class:`CoverageMap`)
   is most likely a spurious box: its score is multiplied by ``lone_view_factor``, so it can
   extend a track (the tracker's low-score rounds) but not start one;
3. **track** (:class:`MultiViewTracker`): ONE :class:`vision.tracker.ByteTracker` on the merged
   detections, drawn as boxes in a virtual top view of the floor (``px_per_m`` pixels per metre,
   floor point ``origin_m`` at pixel (0, 0)), so track ids are shop-wide, not per camera, and
   zones (:mod:`vision.zones`) are drawn once, in that top view.

How a shop's pipeline feeds it: every camera's detector runs on its own frames as today
(``vision.detector``); the frames of one tick (the cameras' frames closest to one timestamp,
e.g. within half a frame interval) go together to :meth:`MultiViewTracker.update` as
``{camera: Detections}`` (a camera with no frame at that tick is simply left out, so it does
not count as having seen nobody), and the :class:`~vision.types.Tracks` it returns feed
:class:`vision.events.ZoneEvents` and the track stream exactly as one camera's tracks do, with
positions already on the floor (docs/fusion.md, "Several ceiling cameras"). Each camera's
homography comes from four or more floor marks of known position seen in its image
(:meth:`FloorView.from_points`). As deployed, each camera's ``type: vision`` pipeline projects
its detections itself and sends them (:func:`encode_frame`) on the shop broker; the GPU node's
``type: floor`` pipeline decodes them (:func:`decode_frame`), groups them into ticks and feeds
:meth:`MultiViewTracker.update_floor` of a tracker made with :meth:`MultiViewTracker.on_floor`.

Numpy only (plus the tracker's scipy), like the rest of the tracker side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vision.tracker import ByteTracker, TrackerConfig
from vision.types import Detections, Tracks
from vision.zones import points_in_polygon

Point = tuple[float, float]


class FloorView(BaseModel):
    """One ceiling camera: how its image maps to the floor and which part of the floor it sees."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    camera: str = Field(min_length=1, description="camera name, as in the frames' Frame.camera")
    homography: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]] = Field(description="3x3 matrix mapping image pixels (x, y, 1) to floor metres (the layout's frame), up to scale")
    anchor: Literal["center", "bottom"] = Field("center", description="the image point of a box that stands on the floor: center for a camera looking straight down, bottom (the feet) for an oblique view")
    coverage: tuple[Point, ...] | None = Field(None, description="floor polygon (metres) the camera sees people in; default: the image's corners mapped to the floor (needs image_size)")
    image_size: tuple[int, int] | None = Field(None, description="image width and height in pixels, to derive coverage")

    @field_validator("homography")
    @classmethod
    def _invertible(cls, v: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        m = np.array(v, dtype=np.float64)
        if not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
            raise ValueError("homography must be a finite, invertible 3x3 matrix (image pixels -> floor metres)")
        return v

    @classmethod
    def from_points(cls, camera: str, image_px: Sequence[Point], floor_m: Sequence[Point], **kw: object) -> FloorView:
        """Return the view whose homography maps ``image_px`` onto ``floor_m`` (4 or more pairs, least squares)."""
        if len(image_px) != len(floor_m) or len(image_px) < 4:
            raise ValueError(f"{camera}: a homography needs at least 4 image/floor point pairs, got {len(image_px)} and {len(floor_m)}")
        rows = []
        for (x, y), (u, v) in zip(image_px, floor_m, strict=True):
            rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
            rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
        _, _, vt = np.linalg.svd(np.array(rows, dtype=np.float64))
        h = vt[-1].reshape(3, 3)
        h = h / h[2, 2] if abs(h[2, 2]) > 1e-12 else h
        return cls.model_validate({"camera": camera, "homography": [[float(a) for a in r] for r in h], **kw})

    def to_floor(self, points_px: np.ndarray) -> np.ndarray:
        """Return image points (N, 2) mapped to floor metres (N, 2)."""
        p = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
        h = np.array(self.homography, dtype=np.float64)
        q = np.c_[p, np.ones(len(p))] @ h.T
        out: np.ndarray = q[:, :2] / q[:, 2:3]
        return out

    def floor_polygon(self) -> np.ndarray | None:
        """Return the floor polygon the camera sees (K, 2), or None if neither coverage nor image_size is given."""
        if self.coverage is not None:
            return np.array(self.coverage, dtype=np.float64)
        if self.image_size is None:
            return None
        w, h = self.image_size
        return self.to_floor(np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64))


@dataclass(frozen=True)
class FloorDetections:
    """One camera's detections on the floor: points ``xy`` (N, 2) and boxes ``boxes`` (N, 4) in metres, ``scores`` (N,), optional ``appearance`` (N, D)."""

    xy: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    appearance: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.xy.shape != (n, 2) or self.boxes.shape != (n, 4) or self.scores.shape != (n,):
            raise ValueError(f"FloorDetections: expected xy ({n}, 2), boxes ({n}, 4), scores ({n},); got {self.xy.shape}, {self.boxes.shape}, {self.scores.shape}")
        if self.appearance is not None and (self.appearance.ndim != 2 or len(self.appearance) != n):
            raise ValueError(f"FloorDetections: appearance must have shape ({n}, D), got {self.appearance.shape}")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls, dims: int | None = None) -> FloorDetections:
        """Return no detections (with appearance vectors of ``dims`` if given)."""
        return cls(np.zeros((0, 2)), np.zeros((0, 4)), np.zeros((0,)), None if dims is None else np.zeros((0, dims)))


def project(view: FloorView, dets: Detections, appearance: np.ndarray | None = None) -> FloorDetections:
    """Return a camera's detections on the floor: anchor point and box corners through its homography."""
    b = dets.xyxy.astype(np.float64)
    n = len(b)
    if n == 0:
        return FloorDetections.empty(None if appearance is None else appearance.shape[1] if appearance.ndim == 2 else None)
    cx = (b[:, 0] + b[:, 2]) / 2
    ay = b[:, 3] if view.anchor == "bottom" else (b[:, 1] + b[:, 3]) / 2
    xy = view.to_floor(np.c_[cx, ay])
    corners = view.to_floor(np.concatenate([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]]))
    cs = corners.reshape(4, n, 2)
    boxes = np.c_[cs[..., 0].min(0), cs[..., 1].min(0), cs[..., 0].max(0), cs[..., 1].max(0)]
    if view.anchor == "bottom":  # an oblique view's box spans the body's lean: keep its size, centred on the feet
        half = (boxes[:, 2:] - boxes[:, :2]) / 2
        boxes = np.c_[xy - half, xy + half]
    return FloorDetections(xy, boxes, dets.scores.astype(np.float64), None if appearance is None else np.asarray(appearance, np.float64))


class CoverageMap:
    """How many views see each point of the floor, on a grid of ``cell_m`` (looked up, not recomputed per frame)."""

    def __init__(self, polygons: Sequence[np.ndarray | None], cell_m: float = 0.1) -> None:
        polys = [np.asarray(p, np.float64) for p in polygons if p is not None]
        self.cell = cell_m
        if not polys:
            self.origin = np.zeros(2)
            self.counts = np.zeros((0, 0), np.int32)
            return
        allp = np.concatenate(polys)
        lo, hi = allp.min(0), allp.max(0)
        self.origin = lo
        nx, ny = int(np.ceil((hi[0] - lo[0]) / cell_m)) + 1, int(np.ceil((hi[1] - lo[1]) / cell_m)) + 1
        gx, gy = np.meshgrid(lo[0] + (np.arange(nx) + 0.5) * cell_m, lo[1] + (np.arange(ny) + 0.5) * cell_m, indexing="ij")
        pts = np.c_[gx.ravel(), gy.ravel()]
        counts = np.zeros(len(pts), np.int32)
        for p in polys:
            counts += points_in_polygon(pts, p)
        self.counts = counts.reshape(nx, ny)

    def count(self, xy: np.ndarray) -> np.ndarray:
        """Return the number of views covering each floor point (N, 2); 0 outside every view."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        if self.counts.size == 0:
            return np.zeros(len(xy), np.int32)
        ij = np.floor((xy - self.origin) / self.cell).astype(np.int64)
        ok = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < self.counts.shape[0]) & (ij[:, 1] < self.counts.shape[1])
        out = np.zeros(len(xy), np.int32)
        out[ok] = self.counts[ij[ok, 0], ij[ok, 1]]
        return out


class MergeConfig(BaseModel):
    """How detections of several views become one set of people on the floor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    gate_m: float = Field(0.3, gt=0, le=2, description="detections of different views closer than this on the floor are one person; larger tolerates worse calibration, but two people closer than it become one")
    min_similarity: float | None = Field(0.3, ge=-1, le=1, description="detections that both carry appearance vectors are one person only if their cosine similarity (with the merged detection's mean so far) is at least this: two people passing closer than gate_m stay two; None merges on the floor distance alone")
    lone_view_factor: float = Field(0.7, gt=0, le=1, description="score multiplier of a detection seen by one view only where at least confirm_views views see the floor (most likely a spurious box); 1 turns it off")
    confirm_views: int = Field(3, ge=2, description="views covering a point from which a detection seen by one of them alone is doubted")
    px_per_m: float = Field(60.0, gt=0, description="pixels per metre of the virtual top view the tracker and the zones work in")
    origin_m: Point = Field((0.0, 0.0), description="floor point (metres) at pixel (0, 0) of the top view")


@dataclass(frozen=True)
class Merged:
    """One tick's people on the floor, each the merge of one or more views' detections.

    ``detections`` are boxes in the virtual top view (what the tracker takes), ``xy`` (M, 2) the
    merged floor points in metres, ``views`` (M,) how many cameras saw each, ``members`` for each
    the (view index, detection index) pairs merged into it, ``appearance`` (M, D) or None.
    """

    detections: Detections
    xy: np.ndarray
    views: np.ndarray
    members: tuple[tuple[tuple[int, int], ...], ...]
    appearance: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.views)


def merge(per_view: Sequence[FloorDetections], config: MergeConfig | None = None, coverage: CoverageMap | None = None) -> Merged:
    """Merge the views' floor detections of one tick into one detection per person (module docstring, step 2)."""
    cfg = config or MergeConfig()
    sizes = [len(fd) for fd in per_view]
    total = sum(sizes)
    if total == 0:
        return Merged(Detections.empty(), np.zeros((0, 2)), np.zeros((0,), np.int64), ())
    parts = [fd for fd in per_view if len(fd)]
    xy = np.concatenate([fd.xy for fd in parts])
    boxes = np.concatenate([fd.boxes for fd in parts])
    scores = np.concatenate([fd.scores for fd in parts]).astype(np.float64)
    view = np.repeat(np.arange(len(per_view)), sizes)
    index = np.concatenate([np.arange(n) for n in sizes if n])
    dims = next((fd.appearance.shape[1] for fd in parts if fd.appearance is not None), None)
    vecs = None
    has_app: list[bool] = [False] * total
    if dims is not None:  # a view without appearance vectors adds nothing to the mean
        vecs = np.concatenate([fd.appearance if fd.appearance is not None else np.zeros((len(fd), dims)) for fd in parts])
        has_app = np.concatenate([np.full(len(fd), fd.appearance is not None) for fd in parts]).tolist()
    # Greedy by score on plain floats: a few dozen boxes a tick, cheaper than numpy per step.
    order = np.argsort(-scores, kind="stable").tolist()
    xs, ys, ws, vs = xy[:, 0].tolist(), xy[:, 1].tolist(), np.maximum(scores, 1e-6).tolist(), view.tolist()
    gate2 = cfg.gate_m**2
    check = vecs is not None and cfg.min_similarity is not None
    cx: list[float] = []
    cy: list[float] = []
    wsum: list[float] = []
    cams: list[set[int]] = []
    looks: list[np.ndarray | None] = []  # each merged detection's appearance so far (unnormalized), for the similarity gate
    label = [0] * total
    for i in order:
        x, y, w, v = xs[i], ys[i], ws[i], vs[i]
        best, best_d = -1, gate2
        for k in range(len(cx)):
            d = (cx[k] - x) ** 2 + (cy[k] - y) ** 2
            if d <= best_d and v not in cams[k]:
                if check and has_app[i] and (lk := looks[k]) is not None:
                    a = vecs[i]  # type: ignore[index]
                    if float(lk @ a) < cfg.min_similarity * float(np.linalg.norm(lk) * np.linalg.norm(a)):  # type: ignore[operator]
                        continue  # two people passing close: they do not look alike
                best, best_d = k, d
        look = w * vecs[i] if check and has_app[i] else None  # type: ignore[index]
        if best < 0:
            label[i] = len(cx)
            cx.append(x)
            cy.append(y)
            wsum.append(w)
            cams.append({v})
            looks.append(look)
            continue
        t = wsum[best] + w
        cx[best] += (x - cx[best]) * w / t
        cy[best] += (y - cy[best]) * w / t
        wsum[best] = t
        cams[best].add(v)
        if look is not None:
            prev = looks[best]
            looks[best] = look if prev is None else prev + look
        label[i] = best
    m = len(cx)
    lab = np.array(label, np.int64)
    w = np.maximum(scores, 1e-6)
    wtot = np.bincount(lab, w, m)
    mboxes = np.stack([np.bincount(lab, w * boxes[:, c], m) for c in range(4)], axis=1) / wtot[:, None]
    mscores = np.zeros(m)
    np.maximum.at(mscores, lab, scores)
    app = None
    if vecs is not None:
        acc = np.zeros((m, vecs.shape[1]))
        np.add.at(acc, lab, w[:, None] * vecs)
        app = acc / np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)
    mxy = np.c_[cx, cy]
    nviews = np.array([len(c) for c in cams], np.int64)
    if coverage is not None and cfg.lone_view_factor < 1:
        lone = (nviews == 1) & (coverage.count(mxy) >= cfg.confirm_views)
        mscores[lone] *= cfg.lone_view_factor
    members: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    for i, k in enumerate(label):
        members[k].append((vs[i], int(index[i])))
    s, (ox, oy) = cfg.px_per_m, cfg.origin_m
    px = (mboxes - np.array([ox, oy, ox, oy])) * s
    dets = Detections(px.astype(np.float32), np.clip(mscores, 0, 1).astype(np.float32), np.zeros(m, np.int64))
    return Merged(dets, mxy, nviews, tuple(tuple(x) for x in members), app)


class MultiViewTracker:
    """Project, merge and track the detections of several ceiling cameras: one set of shop-wide track ids.

    Built from :class:`FloorView` s (homographies: it projects image detections itself, :meth:`update`),
    or with :meth:`on_floor` from each camera's floor coverage only, for detections that arrive
    already on the floor (:meth:`update_floor`, what the agent's ``type: floor`` pipeline does
    with the cameras' detection streams). Both paths merge and track alike.
    """

    def __init__(self, views: Sequence[FloorView], config: MergeConfig | None = None, tracker: TrackerConfig | None = None) -> None:
        self.views = {v.camera: v for v in views}
        self._setup([v.camera for v in views], [v.floor_polygon() for v in views], config, tracker)

    @classmethod
    def on_floor(
        cls, coverage: Mapping[str, Sequence[Point] | np.ndarray | None], config: MergeConfig | None = None, tracker: TrackerConfig | None = None
    ) -> MultiViewTracker:
        """Return a tracker of cameras known by their floor coverage only (polygon in metres, or None), fed with :meth:`update_floor`."""
        self = cls.__new__(cls)
        self.views = {}
        self._setup(list(coverage), [None if p is None else np.asarray(p, np.float64).reshape(-1, 2) for p in coverage.values()], config, tracker)
        return self

    def _setup(self, names: list[str], polygons: list[np.ndarray | None], config: MergeConfig | None, tracker: TrackerConfig | None) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"MultiViewTracker: camera names must be unique and at least one, got {names}")
        self.cameras = names
        self.index = {c: i for i, c in enumerate(names)}
        self.polygons = dict(zip(names, polygons, strict=True))
        self.config = config or MergeConfig()
        self.coverage = CoverageMap(polygons)
        self._partial: dict[frozenset[str], CoverageMap] = {}  # coverage of the cameras that delivered, when some did not
        self.tracker = ByteTracker(tracker)

    def merge(self, frames: Mapping[str, Detections], appearance: Mapping[str, np.ndarray] | None = None) -> Merged:
        """Return one tick's detections of every camera merged on the floor (an unknown camera is an error)."""
        floor: dict[str, FloorDetections] = {}
        for cam, dets in frames.items():
            if cam not in self.views:
                raise ValueError(f"MultiViewTracker: unknown camera {cam!r} (or one without a homography); known: {sorted(self.views)}")
            floor[cam] = project(self.views[cam], dets, None if appearance is None else appearance.get(cam))
        return self.merge_floor(floor)

    def merge_floor(self, frames: Mapping[str, FloorDetections]) -> Merged:
        """Return one tick's floor detections of every camera that delivered, merged (an unknown camera is an error)."""
        per: list[FloorDetections] = [FloorDetections.empty()] * len(self.cameras)
        for cam, fd in frames.items():
            if cam not in self.index:
                raise ValueError(f"MultiViewTracker: unknown camera {cam!r}; known: {sorted(self.index)}")
            per[self.index[cam]] = fd
        coverage = self.coverage
        if len(frames) < len(self.cameras):  # a camera without a frame this tick saw nothing, nor did it miss anyone
            key = frozenset(frames)
            if key not in self._partial:
                self._partial[key] = CoverageMap([self.polygons[c] for c in self.cameras if c in key])
            coverage = self._partial[key]
        return merge(per, self.config, coverage)

    def update(self, frames: Mapping[str, Detections], ts: float = 0.0, appearance: Mapping[str, np.ndarray] | None = None) -> tuple[Tracks, Merged]:
        """Feed one tick of every camera's detections; return the tracks (top-view pixels) and the merged detections."""
        merged = self.merge(frames, appearance)
        return self.tracker.update(merged.detections, ts=ts), merged

    def update_floor(self, frames: Mapping[str, FloorDetections], ts: float = 0.0) -> tuple[Tracks, Merged]:
        """Feed one tick of the cameras' detections already on the floor; return the tracks and the merged detections."""
        merged = self.merge_floor(frames)
        return self.tracker.update(merged.detections, ts=ts), merged

    def to_floor(self, xyxy: np.ndarray) -> np.ndarray:
        """Return the floor points (metres) of top-view boxes (e.g. ``Tracks.xyxy``): their centres."""
        b = np.asarray(xyxy, np.float64).reshape(-1, 4)
        s, (ox, oy) = self.config.px_per_m, self.config.origin_m
        out: np.ndarray = np.c_[(b[:, 0] + b[:, 2]) / 2 / s + ox, (b[:, 1] + b[:, 3]) / 2 / s + oy]
        return out


# ----- the detection stream's wire format --------------------------------------------------------

WIRE_VERSION = 1
MAX_DETECTIONS = 256
"""Most detections one message may carry (a camera seeing a few people; more is a broken detector)."""
MAX_APPEARANCE_DIMS = 512


class WireError(ValueError):
    """A detection message that cannot be used; ``reason`` is the counted label (``bad_json``, ``schema``, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class FloorFrame:
    """One camera frame's detections on the floor, as the detection stream carries them."""

    camera: str
    ts: float
    seq: int
    detections: FloorDetections


def encode_frame(camera: str, ts: float, seq: int, fd: FloorDetections) -> bytes:
    """Return the compact JSON of one frame's floor detections (docs/protocol.md, "Shop-local topics").

    ``{"v": 1, "camera": c, "ts": t, "seq": n, "d": [[x, y, x_min, y_min, x_max, y_max, score], ...], "app": [[...], ...]}``:
    one row of numbers per detection (metres, the layout's frame), ``app`` (appearance vectors) only when the
    detector gives them. Numbers keep full precision (JSON's shortest exact form of a float), so the floor
    pipeline merges and tracks exactly what the camera projected.
    """
    import json

    rows: object = np.c_[fd.xy, fd.boxes, fd.scores].tolist() if len(fd) else []
    body: dict[str, object] = {"v": WIRE_VERSION, "camera": camera, "ts": float(ts), "seq": int(seq), "d": rows}
    if fd.appearance is not None and len(fd):
        body["app"] = np.asarray(fd.appearance, np.float64).tolist()
    return json.dumps(body, separators=(",", ":")).encode()


def decode_frame(payload: bytes) -> FloorFrame:
    """Parse and check one detection message; raise :class:`WireError` naming the reason and what is wrong."""
    import json
    import math

    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError("bad_json", f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("bad_json", "not a JSON object")
    if body.get("v") != WIRE_VERSION:
        raise WireError("version", f"version {body.get('v')!r}, this reader knows {WIRE_VERSION}")
    camera, ts, seq, rows = body.get("camera"), body.get("ts"), body.get("seq"), body.get("d")
    if not isinstance(camera, str) or not camera:
        raise WireError("schema", "camera must be a non-empty string")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise WireError("schema", f"ts must be a finite number, got {ts!r}")
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise WireError("schema", f"seq must be an integer, got {seq!r}")
    if not isinstance(rows, list) or len(rows) > MAX_DETECTIONS:
        raise WireError("schema", f"d must be a list of at most {MAX_DETECTIONS} detections")
    try:
        arr = np.array(rows, np.float64).reshape(-1, 7) if rows else np.zeros((0, 7))
    except (ValueError, TypeError):
        raise WireError("schema", "each detection must be [x, y, x_min, y_min, x_max, y_max, score] (numbers)") from None
    if arr.shape != (len(rows), 7) or not np.isfinite(arr).all():
        raise WireError("schema", "each detection must be 7 finite numbers [x, y, x_min, y_min, x_max, y_max, score]")
    if len(arr) and (((arr[:, 4] < arr[:, 2]) | (arr[:, 5] < arr[:, 3])).any() or (arr[:, 6] < 0).any() or (arr[:, 6] > 1).any()):
        raise WireError("schema", "a box has max < min, or a score is outside [0, 1]")
    app = None
    if "app" in body:
        raw = body["app"]
        try:
            app = np.array(raw, np.float64)
        except (ValueError, TypeError):
            raise WireError("schema", "app must be one list of numbers per detection") from None
        if app.ndim != 2 or len(app) != len(arr) or not 0 < app.shape[1] <= MAX_APPEARANCE_DIMS or not np.isfinite(app).all():
            raise WireError("schema", f"app must hold one vector (1..{MAX_APPEARANCE_DIMS} finite numbers) per detection")
    return FloorFrame(camera, float(ts), seq, FloorDetections(arr[:, :2].copy(), arr[:, 2:6].copy(), arr[:, 6].copy(), app))

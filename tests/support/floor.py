"""A grid of ceiling cameras as deployed: each camera's image detections of a scenario, and its homography.

``fusion.sim`` plays a ``--cameras grid`` scenario's shoppers and gives each view's detections on
the floor (``_Views.detect``, with its noise and occlusion). Here each view also gets an image:
a FloorView whose homography maps its image (100 px per metre, every other camera turned by a
quarter) onto its floor rectangle, and each floor box becomes the image box that projects back
onto it. What the floor pipeline tests send over the broker are these image detections projected
by the vision side's own code, and the reference is ``MultiViewTracker.update`` on the same image
detections in process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import yaml

import fusion.sim as sim
from edge_agent.pipelines.vision import DetectionStream
from fusion.generate import generate
from fusion.scenario import Scenario
from vision.multiview import FloorView, MergeConfig, MultiViewTracker
from vision.types import Detections

PX_PER_M = 100.0
TICK_HZ = 10.0


@dataclass
class Grid:
    """A scenario's cameras (views, in order), merge config, top-view zones, and frames: (tick index, {camera: image Detections})."""

    scenario: Scenario
    views: list[FloorView]
    merge: MergeConfig
    zones: dict
    frames: list[tuple[int, dict[str, Detections]]]


def _view(camera: str, rect: tuple[float, float, float, float], turned: bool) -> FloorView:
    x0, y0, x1, y1 = rect
    w, h = (y1 - y0, x1 - x0) if turned else (x1 - x0, y1 - y0)
    img = [(0.0, 0.0), (w * PX_PER_M, 0.0), (w * PX_PER_M, h * PX_PER_M), (0.0, h * PX_PER_M)]
    floor = [(x0, y0), (x0, y1), (x1, y1), (x1, y0)] if turned else [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return FloorView.from_points(camera, img, floor, image_size=(round(w * PX_PER_M), round(h * PX_PER_M)))


def image_boxes(view: FloorView, floor_boxes: np.ndarray) -> np.ndarray:
    """Return the image boxes (N, 4) whose corners map onto the floor boxes (N, 4) through the view's homography."""
    inv = np.linalg.inv(np.array(view.homography, np.float64))
    b = np.asarray(floor_boxes, np.float64).reshape(-1, 4)
    corners = np.concatenate([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]])
    q = np.c_[corners, np.ones(len(corners))] @ inv.T
    p = (q[:, :2] / q[:, 2:3]).reshape(4, len(b), 2)
    return np.c_[p[..., 0].min(0), p[..., 1].min(0), p[..., 0].max(0), p[..., 1].max(0)]


def grid(name: str = "single", seed: int = 1, seconds: float | None = None, base_tick: int = 0) -> Grid:
    """Play a grid scenario's shoppers and return each camera's image detections per frame (10 fps, tick ``base_tick + k``)."""
    scenario = generate(name, seed=seed, cameras="grid")
    cam = scenario.camera
    visits = sim.plan(scenario, random.Random(f"plan:{seed}"))
    multi = sim._Views(cam, visits, seed)
    views = [_view(v.id, v.floor, i % 2 == 1) for i, v in enumerate(cam.views)]
    rng = np.random.default_rng(seed)
    end = max(v.end for v in visits) + 3.0 if seconds is None else seconds
    frames: list[tuple[int, dict[str, Detections]]] = []
    for k in range(int(end * TICK_HZ)):
        per_view, _ = multi.detect(visits, [], k / TICK_HZ, rng)
        out = {}
        for view, fd in zip(views, per_view, strict=True):
            xyxy = image_boxes(view, fd.boxes).astype(np.float32) if len(fd) else np.zeros((0, 4), np.float32)
            out[view.camera] = Detections(xyxy, fd.scores.astype(np.float32), np.zeros(len(fd), np.int64))
        frames.append((base_tick + k, out))
    zones, _, _ = sim._zones(scenario)
    merge = MergeConfig(px_per_m=cam.px_per_m, origin_m=(0.0, -cam.outside_m))
    return Grid(scenario, views, merge, zones.model_dump(mode="json"), frames)


def reference(g: Grid, frames: list[tuple[int, dict[str, Detections]]] | None = None) -> list[dict]:
    """Track the frames in process (``MultiViewTracker.update``): per tick, what the floor pipeline publishes on the track topic."""
    mvt = MultiViewTracker(g.views, g.merge)
    out = []
    for k, per in g.frames if frames is None else frames:
        if not per:
            continue
        ts = k / TICK_HZ
        tracks, _ = mvt.update(per, ts=ts)
        xy = mvt.to_floor(tracks.xyxy)
        out.append({"ts": round(ts, 3), "tracks": [[int(i), round(float(p[0]), 3), round(float(p[1]), 3)] for i, p in zip(tracks.ids.tolist(), xy, strict=True)],
                    "ended": [int(i) for i in tracks.ended]})
    return out


CAMERAS_NODE = "cams"
"""The node part of the broker user ``<shop>.cams`` that stands in for the grid's cameras' detection streams."""
FLOOR_NODE = "floor"
"""The node part of the floor pipeline's broker user ``<shop>.floor``: its tracks go to ``tracks/floor/floor``."""


def detection_stream(shop: str, homography: object, node: str = CAMERAS_NODE) -> DetectionStream:
    """Return a camera's ``detections:`` config publishing as ``<shop>.<node>`` (the topic's node)."""
    return DetectionStream.model_validate({"shop": shop, "homography": homography, "broker": {"username": f"{shop}.{node}"}})


def floor_config(g: Grid, zones_path: str, shop: str, port: int, node: str = CAMERAS_NODE, **kw: object) -> dict:
    """Return a ``type: floor`` pipeline entry for the grid's cameras (coverage: each view's image corners on the floor),
    each bound to the publisher ``node``, the pipeline's own user ``<shop>.floor``."""
    cameras = [{"camera": v.camera, "node": node, "coverage": v.floor_polygon().tolist()} for v in g.views]  # type: ignore[union-attr]
    broker = {"port": port, "username": f"{shop}.{FLOOR_NODE}", "reconnect_min_s": 0.2, "reconnect_max_s": 1.0}
    return {"type": "floor", "name": "floor", "shop": shop, "zones": zones_path, "cameras": cameras,
            "merge": g.merge.model_dump(mode="json"), "broker": broker, **kw}


def write_zones(g: Grid, path) -> str:
    """Write the grid's top-view zones (anchor: center) to ``path``; return it as a string."""
    path.write_text(yaml.safe_dump(g.zones))
    return str(path)

"""Zones of one camera (shelf polygons, a directed door line) and the geometry they need.

The zones file is YAML, one per camera, validated by pydantic with ``extra="forbid"``, so a typo
in a key is an error naming the file, the key and the fix, never a silently ignored shelf.
Coordinates are pixels of the camera image; ``check_fits`` is called with the first frame's
size, and a zone outside the image is refused (it could never fire, which is worse than failing).

The door is a directed line from ``a`` to ``b``: looking from ``a`` towards ``b``, a shopper who
crosses from the ``enter_from`` side to the other side has entered. Geometry helpers are pure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vision.errors import ZonesInvalid

Point = tuple[float, float]


class Shelf(BaseModel):
    """A shelf zone: a polygon on the floor in front of a shelf."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="zone name used in events, e.g. shelf-3")
    polygon: list[Point] = Field(min_length=3, description="corners in image pixels [[x, y], ...], in order around the zone")
    dwell_seconds: float = Field(3.0, gt=0, description="time a shopper must stay inside before a dwell event; lower catches brief looks, higher only real interest")

    @field_validator("polygon")
    @classmethod
    def _non_degenerate(cls, v: list[Point]) -> list[Point]:
        if abs(polygon_area(np.array(v, dtype=np.float64))) < 1.0:
            raise ValueError("polygon has (almost) zero area; list at least three corners that are not on one line")
        return v


class Door(BaseModel):
    """The door line, directed from ``a`` to ``b``."""

    model_config = ConfigDict(extra="forbid")
    a: Point = Field(description="start of the door line [x, y] in image pixels")
    b: Point = Field(description="end of the door line [x, y] in image pixels")
    enter_from: Literal["left", "right"] = Field(description="side (looking from a to b) a shopper comes from when entering")

    @model_validator(mode="after")
    def _has_length(self) -> Door:
        if np.hypot(self.b[0] - self.a[0], self.b[1] - self.a[1]) < 1.0:
            raise ValueError("door line a and b are the same point; give two distinct points")
        return self


class ZonesConfig(BaseModel):
    """The zones of one camera."""

    model_config = ConfigDict(extra="forbid")
    camera: str = Field(min_length=1, description="camera name these zones belong to")
    anchor: Literal["bottom_center", "center"] = Field("bottom_center", description="point of a person's box that is tested against zones: feet for side views, centre for ceiling cameras")
    door: Door | None = Field(None, description="door line for person_entered/person_exited events")
    shelves: list[Shelf] = Field(default_factory=list, description="shelf zones for zone_enter/zone_exit/dwell events")

    @model_validator(mode="after")
    def _unique_names(self) -> ZonesConfig:
        names = [s.name for s in self.shelves]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"shelf names must be unique; repeated: {sorted(dup)}")
        return self

    def check_fits(self, width: int, height: int) -> None:
        """Raise ZonesInvalid naming the first zone point outside a width x height image."""
        shapes: list[tuple[str, list[Point]]] = [(f"shelves[{s.name}].polygon", s.polygon) for s in self.shelves]
        if self.door:
            shapes.append(("door", [self.door.a, self.door.b]))
        for key, pts in shapes:
            for x, y in pts:
                if not (0 <= x <= width and 0 <= y <= height):
                    raise ZonesInvalid(
                        "outside-image",
                        f"zones of camera {self.camera}: {key} point ({x:g}, {y:g}) is outside the {width}x{height} image; "
                        "zone coordinates are pixels of the camera frame, fix the zones file for this resolution",
                    )


def load_zones(path: str | Path) -> ZonesConfig:
    """Load a zones YAML file; raise ZonesInvalid naming the file, key and fix."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ZonesInvalid("missing-file", f"zones file {p} does not exist; pass --zones with the camera's zones YAML") from None
    except yaml.YAMLError as exc:
        raise ZonesInvalid("bad-yaml", f"zones file {p}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise ZonesInvalid("bad-yaml", f"zones file {p}: expected a mapping with camera, door, shelves")
    try:
        return ZonesConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "(root)"
        hint = "remove it (allowed keys: see docs/vision.md)" if err["type"] == "extra_forbidden" else "see docs/vision.md for the format"
        raise ZonesInvalid("bad-key", f"zones file {p}: key '{key}': {err['msg']}; {hint}") from None


def polygon_area(poly: np.ndarray) -> float:
    """Return the signed area of a polygon (shoelace formula)."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def points_in_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Return a bool per (x, y) point: inside the polygon (even-odd rule, vectorised ray casting)."""
    if len(points) == 0:
        return np.zeros((0,), bool)
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    crosses = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        xint = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    inside: np.ndarray = ((crosses & (x < xint)).sum(axis=1) % 2) == 1
    return inside


def side_of_line(points: np.ndarray, a: Point, b: Point) -> np.ndarray:
    """Return +1 for points left of a->b (image coordinates, y down), -1 for right, 0 on the line."""
    ax, ay = a
    bx, by = b
    cross = (bx - ax) * (points[:, 1] - ay) - (by - ay) * (points[:, 0] - ax)
    # y grows downwards in images, so a positive cross product is on the viewer's right.
    return -np.sign(cross).astype(np.int64)


def segments_intersect(p: Point, q: Point, a: Point, b: Point) -> bool:
    """Return True if segment p-q crosses or touches segment a-b."""

    def orient(u: Point, v: Point, w: Point) -> float:
        return (v[0] - u[0]) * (w[1] - u[1]) - (v[1] - u[1]) * (w[0] - u[0])

    def on_seg(u: Point, v: Point, w: Point) -> bool:
        return min(u[0], v[0]) <= w[0] <= max(u[0], v[0]) and min(u[1], v[1]) <= w[1] <= max(u[1], v[1])

    d1, d2, d3, d4 = orient(a, b, p), orient(a, b, q), orient(p, q, a), orient(p, q, b)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return (d1 == 0 and on_seg(a, b, p)) or (d2 == 0 and on_seg(a, b, q)) or (d3 == 0 and on_seg(p, q, a)) or (d4 == 0 and on_seg(p, q, b))


def anchor_points(xyxy: np.ndarray, anchor: str) -> np.ndarray:
    """Return the point of each box tested against zones."""
    cx = (xyxy[:, 0] + xyxy[:, 2]) / 2
    y = xyxy[:, 3] if anchor == "bottom_center" else (xyxy[:, 1] + xyxy[:, 3]) / 2
    return np.stack([cx, y], axis=1).astype(np.float64)

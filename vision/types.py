"""The typed values that flow between pipeline stages: Frame, Detections, Tracks, ShopEvent.

Each stage takes one of these and returns the next (capture -> Frame -> detect -> Detections ->
track -> Tracks -> zones -> ShopEvent). Like roboflow/supervision's ``Detections``, they are
dataclasses of numpy arrays checked in ``__post_init__``, so a bad value fails where it is made,
with a message naming the field, not three stages later as an IndexError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from vision.errors import FrameInvalid

EVENT_KINDS = ("person_entered", "person_exited", "zone_enter", "zone_exit", "dwell", "occupancy")
EventKind = Literal["person_entered", "person_exited", "zone_enter", "zone_exit", "dwell", "occupancy"]


@dataclass(frozen=True)
class Frame:
    """One decoded camera image (BGR, uint8, H x W x 3) with where and when it was taken."""

    image: np.ndarray
    camera: str
    index: int
    ts: float

    def __post_init__(self) -> None:
        img = self.image
        if not isinstance(img, np.ndarray):
            raise FrameInvalid("not-an-array", f"frame {self.index} of {self.camera}: image is {type(img).__name__}, expected a numpy array")
        if img.size == 0:
            raise FrameInvalid("empty", f"frame {self.index} of {self.camera}: image is empty (the source delivered no pixels)")
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise FrameInvalid("bad-shape", f"frame {self.index} of {self.camera}: expected uint8 HxWx3 BGR, got {img.dtype} {img.shape}")
        if not math.isfinite(self.ts):
            raise FrameInvalid("bad-timestamp", f"frame {self.index} of {self.camera}: timestamp {self.ts} is not finite")

    @property
    def height(self) -> int:
        """Return the image height in pixels."""
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        """Return the image width in pixels."""
        return int(self.image.shape[1])


def _check_boxes(kind: str, xyxy: np.ndarray, n: int) -> None:
    if xyxy.shape != (n, 4):
        raise ValueError(f"{kind}: xyxy must have shape ({n}, 4), got {xyxy.shape}")
    if n and (not np.isfinite(xyxy).all() or (xyxy[:, 2] < xyxy[:, 0]).any() or (xyxy[:, 3] < xyxy[:, 1]).any()):
        raise ValueError(f"{kind}: boxes must be finite with x2 >= x1 and y2 >= y1")


@dataclass(frozen=True)
class Detections:
    """Boxes found in one frame: ``xyxy`` (N, 4) float32 pixels, ``scores`` (N,), ``class_ids`` (N,)."""

    xyxy: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        _check_boxes("Detections", self.xyxy, n)
        if self.scores.shape != (n,) or self.class_ids.shape != (n,):
            raise ValueError(f"Detections: scores and class_ids must have shape ({n},), got {self.scores.shape} and {self.class_ids.shape}")
        if n and ((self.scores < 0) | (self.scores > 1)).any():
            raise ValueError("Detections: scores must lie in [0, 1]")

    @classmethod
    def empty(cls) -> Detections:
        """Return detections with no boxes."""
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class Tracks:
    """Confirmed tracks in one frame: ``ids`` (N,) int, ``xyxy`` (N, 4), ``scores`` (N,).

    ``predicted`` (N,) bool marks tracks not matched in this frame (a shopper hidden for a moment):
    their box is the tracker's prediction, not an observation, and ``scores`` holds the score of
    their last detection. Left out, it is all False.
    """

    ids: np.ndarray
    xyxy: np.ndarray
    scores: np.ndarray
    frame_index: int = 0
    ts: float = 0.0
    ended: tuple[int, ...] = field(default=())  # ids the tracker gave up on at this frame
    predicted: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        _check_boxes("Tracks", self.xyxy, n)
        if self.scores.shape != (n,):
            raise ValueError(f"Tracks: scores must have shape ({n},), got {self.scores.shape}")
        if self.predicted is None:
            object.__setattr__(self, "predicted", np.zeros((n,), bool))  # frozen: set once, here
        elif self.predicted.shape != (n,) or self.predicted.dtype != np.bool_:
            raise ValueError(f"Tracks: predicted must be a bool array of shape ({n},), got {self.predicted.dtype} {self.predicted.shape}")
        if len(set(self.ids.tolist())) != n:
            raise ValueError("Tracks: ids must be unique within a frame")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ShopEvent:
    """Something that happened in the shop, as seen by one camera."""

    kind: EventKind
    camera: str
    ts: float
    track_id: int | None = None
    zone: str | None = None
    value: float | None = None  # occupancy count, dwell seconds, seconds spent in a zone
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"ShopEvent: kind {self.kind!r} is not one of {EVENT_KINDS}")
        if not self.camera:
            raise ValueError("ShopEvent: camera must be a non-empty name")
        if self.kind != "occupancy" and self.track_id is None:
            raise ValueError(f"ShopEvent: {self.kind} needs a track_id")
        if self.kind in ("zone_enter", "zone_exit", "dwell") and not self.zone:
            raise ValueError(f"ShopEvent: {self.kind} needs a zone")
        if self.kind in ("occupancy", "dwell") and self.value is None:
            raise ValueError(f"ShopEvent: {self.kind} needs a value")

    def to_dict(self) -> dict[str, Any]:
        """Return the event as a JSON-ready dict."""
        return {
            "kind": self.kind,
            "camera": self.camera,
            "ts": self.ts,
            "track_id": self.track_id,
            "zone": self.zone,
            "value": self.value,
            **({"detail": self.detail} if self.detail else {}),
        }

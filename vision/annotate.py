"""Annotated video for humans: boxes with track ids, shelf zones, the door line and events.

Written with OpenCV's VideoWriter (MJPG for .avi, mp4v for .mp4, both in every OpenCV build), so
an operator can check a zones file against what the camera sees. The writer opens on the first
frame, because only then is the frame size known.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vision.types import Frame, ShopEvent, Tracks
from vision.zones import ZonesConfig

_ZONE = (255, 160, 0)
_DOOR = (0, 200, 255)
_EVENT_FRAMES = 15  # how long an event's label stays on screen


def _color(track_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(track_id)
    c = rng.integers(64, 256, 3)
    return int(c[0]), int(c[1]), int(c[2])


class Annotator:
    """Draw tracks, zones and recent events onto frames and write them to a video file."""

    def __init__(self, path: str | Path, zones: ZonesConfig, labels: list[str]) -> None:
        self.path = Path(path)
        self.zones = zones
        self.labels = labels
        self._writer: cv2.VideoWriter | None = None
        self._recent: list[tuple[int, str]] = []
        self.frames_written = 0

    def _open(self, frame: Frame, fps: float) -> cv2.VideoWriter:
        fourcc = cv2.VideoWriter.fourcc(*("mp4v" if self.path.suffix.lower() == ".mp4" else "MJPG"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        w = cv2.VideoWriter(str(self.path), fourcc, fps if fps > 0 else 10.0, (frame.width, frame.height))
        if not w.isOpened():
            raise OSError(f"cannot write annotated video {self.path}; use a .avi or .mp4 path in a writable directory")
        return w

    def draw(self, frame: Frame, tracks: Tracks, events: list[ShopEvent], occupancy: int) -> np.ndarray:
        """Return a copy of the frame with zones, door, tracks and recent events drawn on it."""
        img = frame.image.copy()
        for s in self.zones.shelves:
            pts = np.array(s.polygon, np.int32).reshape(-1, 1, 2)
            cv2.polylines(img, [pts], True, _ZONE, 2)
            cv2.putText(img, s.name, tuple(pts[0, 0]), cv2.FONT_HERSHEY_SIMPLEX, 0.5, _ZONE, 1, cv2.LINE_AA)
        if self.zones.door:
            a = tuple(int(v) for v in self.zones.door.a)
            b = tuple(int(v) for v in self.zones.door.b)
            cv2.arrowedLine(img, a, b, _DOOR, 2, tipLength=0.05)
            cv2.putText(img, f"door (enter from {self.zones.door.enter_from})", a, cv2.FONT_HERSHEY_SIMPLEX, 0.5, _DOOR, 1, cv2.LINE_AA)
        for tid, box in zip(tracks.ids.tolist(), tracks.xyxy, strict=True):
            x1, y1, x2, y2 = (int(v) for v in box)
            c = _color(tid)
            cv2.rectangle(img, (x1, y1), (x2, y2), c, 2)
            cv2.putText(img, f"#{tid}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, c, 2, cv2.LINE_AA)
        self._recent = [(n - 1, t) for n, t in self._recent if n > 1]
        self._recent += [(_EVENT_FRAMES, f"{e.kind} #{e.track_id}" + (f" {e.zone}" if e.zone else "")) for e in events if e.kind != "occupancy"]
        cv2.putText(img, f"frame {frame.index}  inside: {occupancy}", (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
        for i, (_, text) in enumerate(self._recent[-6:]):
            cv2.putText(img, text, (8, 44 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 255, 0), 2, cv2.LINE_AA)
        return img

    def write(self, frame: Frame, tracks: Tracks, events: list[ShopEvent], occupancy: int, fps: float = 10.0) -> None:
        """Draw the frame and append it to the video (played back at ``fps``, the source's rate)."""
        if self._writer is None:
            self._writer = self._open(frame, fps)
        self._writer.write(self.draw(frame, tracks, events, occupancy))
        self.frames_written += 1

    def close(self) -> None:
        """Finish the video file."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None

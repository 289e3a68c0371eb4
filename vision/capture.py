"""Frame capture with OpenCV from a file, an RTSP/HTTP URL or a V4L2 device.

A reader thread decodes frames into a one-frame slot. Two modes:

- ``live`` (cameras, streams): the slot always holds the newest frame; if the pipeline has not
  taken the previous one it is overwritten and counted as dropped. A slow detector therefore
  works on what is in front of the camera now, never on a growing queue of stale frames.
  When the stream fails to open or stops delivering, the reader reconnects with exponential
  backoff (``backoff_initial`` doubling up to ``backoff_max``) and counts the reconnects.
- ``every frame`` (files, offline runs, tests): the reader waits until the slot is taken, so
  every frame is processed, in order, with timestamps from the video clock (index / fps), which
  makes results reproducible. Decoding still overlaps with inference.

Frames that are unusable (empty, wrong shape) are dropped and counted by reason; the reader
never dies of one. The ``opener`` argument is the I/O seam (``cv2.VideoCapture`` by default).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from vision.errors import FrameInvalid, SourceUnavailable
from vision.types import Frame

log = logging.getLogger(__name__)

SourceKind = Literal["file", "stream", "device"]


class VideoLike(Protocol):
    """The part of ``cv2.VideoCapture`` capture uses."""

    def isOpened(self) -> bool: ...
    def read(self) -> tuple[bool, Any]: ...
    def get(self, prop: int) -> float: ...
    def release(self) -> None: ...


def classify_source(src: str) -> tuple[SourceKind, str | int]:
    """Return what kind of source ``src`` is and the argument OpenCV opens it with."""
    if re.fullmatch(r"\d+", src):
        return "device", int(src)
    if src.startswith("/dev/video"):
        return "device", src
    if re.match(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", src, re.IGNORECASE):
        return "stream", src
    return "file", src


def default_opener(target: str | int, kind: SourceKind) -> VideoLike:
    """Open a source with the OpenCV backend that fits it."""
    if kind == "device":
        return cv2.VideoCapture(target, cv2.CAP_V4L2)
    if kind == "stream":
        # Bound FFmpeg's open/read waits so a dead camera is noticed in seconds, not minutes.
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 5000, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 5000])
    return cv2.VideoCapture(str(target), cv2.CAP_FFMPEG)


@dataclass(frozen=True)
class CaptureStats:
    """Counters of one capture, for health reports and metrics."""

    frames_read: int
    frames_dropped: int
    bad_frames: dict[str, int]
    reconnects: int
    connected: bool
    last_frame_monotonic: float | None
    last_error: str | None
    fps: float


class Capture:
    """Read frames from one source on a thread; ``read`` returns the next (or newest) frame."""

    def __init__(
        self,
        source: str,
        *,
        camera: str = "camera",
        live: bool | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        pace: bool | None = None,
        opener: Callable[[str | int, SourceKind], VideoLike] = default_opener,
    ) -> None:
        self.source = source
        self.camera = camera
        self.kind, self._target = classify_source(source)
        self.live = self.kind != "file" if live is None else live
        # A file read in live mode plays at its own frame rate, like a camera would deliver it.
        self.pace = (self.live and self.kind == "file") if pace is None else pace
        self.backoff_initial, self.backoff_max = backoff_initial, backoff_max
        self._opener = opener
        self._cond = threading.Condition()
        self._slot: Frame | None = None
        self._eof = False
        self._stop = threading.Event()
        self._read = self._dropped = self._reconnects = 0
        self._bad: Counter[str] = Counter()
        self._connected = False
        self._last_mono: float | None = None
        self._last_error: str | None = None
        self.fps = 0.0
        if self.kind == "file" and not self.live and not Path(source).is_file():
            raise SourceUnavailable("missing-file", f"video file {source} does not exist; check --source")
        self._thread = threading.Thread(target=self._run, name=f"capture-{camera}", daemon=True)
        self._thread.start()

    def _open(self) -> VideoLike:
        cap = self._opener(self._target, self.kind)
        if not cap.isOpened():
            cap.release()
            raise SourceUnavailable("open-failed", f"cannot open {self.kind} source {self.source!r}; check the path/URL/device and that the camera is up")
        return cap

    def _run(self) -> None:
        delay = self.backoff_initial
        index = 0
        while not self._stop.is_set():
            try:
                cap = self._open()
            except SourceUnavailable as exc:
                self._fail(str(exc))
                if not self.live:
                    self._finish()
                    return
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            with self._cond:
                self._connected = True
                self._last_error = None
            fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            self.fps = fps if 0 < fps < 1000 else 25.0
            got_any = self._pump(cap, index)
            index += got_any
            cap.release()
            with self._cond:
                self._connected = False
            if not self.live:
                self._finish()
                return
            if got_any:
                delay = self.backoff_initial  # it worked for a while: start the backoff over
            self._fail(f"{self.kind} source {self.source!r} stopped delivering frames; reconnecting")
            self._stop.wait(delay)
            delay = min(delay * 2, self.backoff_max)

    def _pump(self, cap: VideoLike, start: int) -> int:
        """Read until the source fails or we stop; return how many frames were read."""
        n = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            ok, img = cap.read()
            if not ok:
                return n
            index = start + n
            n += 1
            ts = index / self.fps if not self.live else time.time()
            try:
                frame = Frame(img if isinstance(img, np.ndarray) else np.asarray(img), self.camera, index, ts)
            except FrameInvalid as exc:
                with self._cond:
                    self._bad[exc.reason] += 1
                log.warning("camera %s: dropped frame %s: %s", self.camera, index, exc)
                continue
            if self.pace:
                due = t0 + n / self.fps
                now = time.monotonic()
                if now - due > 1 / self.fps:
                    # Behind by more than a frame (a stalled process): a camera would not deliver
                    # the frames it missed in a burst, so restart the schedule from now.
                    t0 = now - n / self.fps
                self._stop.wait(max(0.0, due - now))
            with self._cond:
                if not self.live:
                    while self._slot is not None and not self._stop.is_set():
                        self._cond.wait(0.1)
                elif self._slot is not None:
                    self._dropped += 1
                self._slot = frame
                self._read += 1
                self._last_mono = time.monotonic()
                self._cond.notify_all()
        return n

    def _fail(self, message: str) -> None:
        with self._cond:
            if message != self._last_error:
                log.warning("camera %s: %s", self.camera, message)
            self._last_error = message
            if self.live:
                self._reconnects += 1

    def _finish(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read(self, timeout: float = 1.0) -> Frame | None:
        """Return the next frame (the newest one in live mode), or None on timeout or end of file."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            frame, self._slot = self._slot, None
            self._cond.notify_all()
            return frame

    @property
    def finished(self) -> bool:
        """Return True once a non-live source has delivered its last frame."""
        with self._cond:
            return self._eof and self._slot is None

    def stats(self) -> CaptureStats:
        """Return a snapshot of the capture's counters."""
        with self._cond:
            return CaptureStats(self._read, self._dropped, dict(self._bad), self._reconnects, self._connected, self._last_mono, self._last_error, self.fps)

    def close(self) -> None:
        """Stop the reader thread and release the source."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=10)

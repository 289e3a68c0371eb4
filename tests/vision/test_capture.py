"""Capture: every frame from files, the newest frame from live sources, reconnects, bad frames."""

from __future__ import annotations

import itertools
import shutil
import time

import numpy as np
import pytest

from tests.support.wait import wait_for
from vision.capture import Capture, classify_source
from vision.errors import SourceUnavailable


@pytest.mark.parametrize(
    "src,kind,target",
    [
        pytest.param("0", "device", 0, id="index"),
        pytest.param("/dev/video2", "device", "/dev/video2", id="v4l2-path"),
        pytest.param("rtsp://10.0.0.5:554/stream1", "stream", "rtsp://10.0.0.5:554/stream1", id="rtsp"),
        pytest.param("HTTP://cam/mjpg", "stream", "HTTP://cam/mjpg", id="http-any-case"),
        pytest.param("clips/door.mp4", "file", "clips/door.mp4", id="file"),
    ],
)
def test_classify_source(src: str, kind: str, target) -> None:
    assert classify_source(src) == (kind, target)


def test_file_delivers_every_frame_in_order(short_clip) -> None:
    cap = Capture(str(short_clip), camera="c")
    try:
        indices = []
        while (f := cap.read(5.0)) is not None:
            indices.append(f.index)
            assert (f.width, f.height, f.camera) == (384, 288, "c")
            assert f.ts == pytest.approx(f.index / 10.0)  # video clock, 10 fps
        assert indices == list(range(40)) and cap.finished
        assert cap.stats().frames_dropped == 0
    finally:
        cap.close()


def test_live_source_keeps_only_the_newest_frame(short_clip) -> None:
    """A consumer slower than the camera gets fresh frames and the capture counts what it skipped."""
    cap = Capture(str(short_clip), camera="c", live=True)
    try:
        got = []
        for _ in range(6):
            f = cap.read(5.0)
            assert f is not None
            got.append(f.index)
            time.sleep(0.25)  # simulate a slow detector: 2.5 camera frames per processed frame
        s = cap.stats()
        assert s.frames_dropped >= 5 and s.connected
        assert all(b - a >= 2 for a, b in itertools.pairwise(got)), got
        assert s.frames_read >= s.frames_dropped + len(got)  # every frame read was either taken or counted
    finally:
        cap.close()


def test_unreachable_stream_is_retried_with_backoff_not_fatal() -> None:
    cap = Capture("rtsp://127.0.0.1:9/none", camera="door", backoff_initial=0.05, backoff_max=0.2)
    try:
        assert cap.read(0.5) is None
        wait_for(lambda: cap.stats().reconnects >= 2, what="two reconnect attempts")
        s = cap.stats()
        assert not s.connected and "cannot open stream source" in s.last_error
    finally:
        cap.close()


def test_source_that_appears_later_is_picked_up(short_clip, tmp_path) -> None:
    """A camera that is down at start and comes up later delivers frames without a restart."""
    path = tmp_path / "cam.avi"
    cap = Capture(str(path), camera="c", live=True, pace=False, backoff_initial=0.05, backoff_max=0.1)
    try:
        wait_for(lambda: cap.stats().reconnects >= 1, what="a failed open")
        shutil.copy(short_clip, path)
        frame = cap.read(10.0)
        assert frame is not None and cap.stats().connected
    finally:
        cap.close()


def test_missing_file_is_an_error_naming_it(tmp_path) -> None:
    with pytest.raises(SourceUnavailable, match="does not exist; check --source"):
        Capture(str(tmp_path / "nope.avi"))


class _Flaky:
    """A video source (the opener seam) that yields good frames with empty and odd ones mixed in."""

    def __init__(self) -> None:
        self.i = 0

    def isOpened(self) -> bool:
        return True

    def read(self):
        self.i += 1
        if self.i > 12:
            return False, None
        if self.i % 4 == 0:
            return True, np.zeros((0, 0, 3), np.uint8)
        if self.i % 6 == 0:
            return True, np.zeros((10, 10), np.uint8)  # grey, not BGR
        return True, np.full((20, 30, 3), self.i, np.uint8)

    def get(self, prop: int) -> float:
        return 25.0

    def release(self) -> None:
        pass


def test_bad_frames_are_counted_and_skipped(tmp_path) -> None:
    p = tmp_path / "x.avi"
    p.write_bytes(b"")
    cap = Capture(str(p), camera="c", opener=lambda target, kind: _Flaky())
    try:
        values = []
        while (f := cap.read(5.0)) is not None:
            values.append(int(f.image[0, 0, 0]))
        assert values == [1, 2, 3, 5, 7, 9, 10, 11]
        assert cap.stats().bad_frames == {"empty": 3, "bad-shape": 1}
    finally:
        cap.close()

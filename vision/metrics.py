"""Prometheus metrics of the vision pipeline, registered in a registry the caller passes in.

The registry is an argument (as in client_python's collectors) so the edge agent exposes these
on its own ``/metrics`` and tests read them from a private registry without global state.
Capture counters live in the capture thread; ``observe_capture`` turns their snapshots into
counter increments so a counter never goes backwards.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vision.capture import CaptureStats

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class VisionMetrics:
    """The pipeline's counters, gauges and histograms, labelled by camera."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.frames = Counter("shopfleet_vision_frames_total", "Frames processed by the pipeline", ["camera"], registry=registry)
        self.dropped = Counter("shopfleet_vision_frames_dropped_total", "Frames the capture overwrote before the pipeline took them (pipeline slower than the camera)", ["camera"], registry=registry)
        self.bad_frames = Counter("shopfleet_vision_bad_frames_total", "Unusable frames dropped by the capture, by reason", ["camera", "reason"], registry=registry)
        self.reconnects = Counter("shopfleet_vision_reconnects_total", "Times a camera source failed and was reopened", ["camera"], registry=registry)
        self.events = Counter("shopfleet_vision_events_total", "Shop events emitted, by kind", ["camera", "kind"], registry=registry)
        self.errors = Counter("shopfleet_vision_errors_total", "Frames whose processing failed, by reason", ["camera", "reason"], registry=registry)
        self.stage = Histogram("shopfleet_vision_stage_seconds", "Time per frame spent in each pipeline stage", ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self.latency = Histogram("shopfleet_vision_latency_seconds", "Time from frame capture to its events", ["camera"], buckets=STAGE_BUCKETS, registry=registry)
        self.fps = Gauge("shopfleet_vision_fps", "Frames per second processed, over the last few seconds", ["camera"], registry=registry)
        self.frame_age = Gauge("shopfleet_vision_last_frame_age_seconds", "Seconds since the camera delivered its last frame", ["camera"], registry=registry)
        self.occupancy = Gauge("shopfleet_vision_occupancy", "People inside the shop as counted at this camera's door", ["camera"], registry=registry)
        self._seen: dict[str, CaptureStats] = {}

    def observe_capture(self, camera: str, stats: CaptureStats) -> None:
        """Advance the capture counters of ``camera`` to a new snapshot."""
        prev = self._seen.get(camera)
        self.dropped.labels(camera).inc(stats.frames_dropped - (prev.frames_dropped if prev else 0))
        self.reconnects.labels(camera).inc(stats.reconnects - (prev.reconnects if prev else 0))
        for reason, n in stats.bad_frames.items():
            self.bad_frames.labels(camera, reason).inc(n - (prev.bad_frames.get(reason, 0) if prev else 0))
        self._seen[camera] = stats

"""``type: vision``: one camera through the vision library (detect -> track -> zone events).

The adapter between the agent's supervisor contract and ``vision.pipeline``: shop events
(``person_entered``, ``person_exited``, ``zone_enter``, ``zone_exit``, ``dwell``) go through the
agent's outbox as events; occupancy goes out as a ``Reading`` (on every change and every
``occupancy_interval_s``, so telemetry has a continuous series); a camera that delivers nothing
for ``dark_after_s`` raises a ``camera_dark`` alert, resolved when frames flow again. Health
(fps, latency, dropped frames, age of the last frame, errors by reason) goes into heartbeats and,
through the agent, ``/metrics``. Every ``gate_interval_s`` the pipeline reports the figures rollout
gates judge through ``sink.gate_metric`` (:data:`GATE_METRICS`), so a canary running a new
model or image is judged on what its cameras actually do.

Heavy libraries (OpenCV, ONNX Runtime) are imported in ``run``, not at module import, because
every node loads the list of pipeline types, and a Pi without a camera should not pay for them.
Model, zones and source problems raise from ``run``: the supervisor restarts with backoff and,
past the budget, reports the pipeline 'failed' with the error (which names the fix) as detail.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge_agent.config import BrokerConfig
from edge_agent.protocol import Reading
from edge_agent.supervisor import EventSink, OwnMetrics, PipelineConfigBase
from vision.tracker import TrackerConfig

log = logging.getLogger(__name__)

GATE_METRICS = {
    "vision_fps": "frames per second processed (recent frames); a node with several cameras reports its slowest",
    "vision_dropped_ratio": "frames dropped / frames seen since the pipeline started (live sources drop stale frames)",
    "vision_error_ratio": "errors (bad frames, reconnects, failed frames) per processed frame since the pipeline started",
}
"""Gate metrics this pipeline reports (name -> meaning); docs/agent.md lists them for policies."""


class _StreamConfig(BaseModel):
    """A shop-local stream's connection: its shop and the broker user that publishes it.

    The stream's topic carries ``{node}``, the node part of ``broker.username`` (``<shop>.<node>``),
    the only node the shop broker lets that user publish under, so ``broker.username`` is required.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: ClassVar[str]  # the pipeline config key of this stream, for errors
    shop: str = Field(min_length=1, description="This node's shop id (the topic's shop).")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The shop broker, with a user of this stream's own (docs/fusion.md).")

    @model_validator(mode="after")
    def _publisher(self) -> _StreamConfig:
        self._check()  # the stream's own checks name their error first
        self.node()
        return self

    def _check(self) -> None:
        """Raise ``ValueError`` for what is wrong in the stream's own keys (none here)."""

    def node(self) -> str:
        """Return the topic's node: the node part of ``broker.username`` (``ValueError`` if unset or another shop's)."""
        from edge_agent.pipelines.fusion import stream_node

        return stream_node(self.broker.username, self.shop, f"{self.key}.broker.username")


class TrackStream(_StreamConfig):
    """Publish confirmed tracks' floor positions on the shop broker, for a ``type: fusion`` pipeline.

    Positions are image points (the zones' anchor) mapped to the shop floor by one scale and an
    origin: right for an overhead camera looking straight down, wrong for an oblique view (no
    homography is applied). They go to the shop-local topic ``local/v1/{shop}/tracks/{node}/{camera}``,
    which the bridge to the central broker never carries (docs/fusion.md); ``{node}`` is the node
    part of ``broker.username`` (``<shop>.<node>``), the only node the shop broker lets that user
    publish under, so ``broker.username`` is required.
    """

    key = "tracks"
    px_per_m: float = Field(gt=0, description="Image pixels per metre on the floor (overhead camera).")
    origin_px: tuple[float, float] = Field((0.0, 0.0), description="Image point of the floor's (0, 0): the layout's origin.")
    interval_s: float = Field(0.1, ge=0, le=10, description="Publish at most this often (0: every frame). Fusion wants 5-10 per second.")


class DetectionStream(_StreamConfig):
    """Publish every processed frame's detections, on the floor, for the shop's ``type: floor`` pipeline.

    Each box goes to floor metres through this camera's image-to-floor homography
    (``vision.multiview.FloorView``): either ``homography`` (3x3, image pixels -> floor metres) or
    four or more floor marks ``image_px`` <-> ``floor_m`` it is fitted from (least squares). The
    frames go to the shop-local topic ``local/v1/{shop}/detections/{node}/{camera}`` (docs/fusion.md,
    "Several ceiling cameras"), never bridged to the central broker; ``{node}`` is the node part
    of ``broker.username`` (``<shop>.<node>``), which the floor pipeline's ``cameras[].node``
    names, so ``broker.username`` is required.
    """

    key = "detections"
    homography: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]] | None = Field(
        None, description="3x3 matrix mapping image pixels (x, y, 1) to floor metres, up to scale; or give image_px and floor_m."
    )
    image_px: list[tuple[float, float]] | None = Field(None, description="Image points [x, y] of floor marks (4 or more), paired with floor_m.")
    floor_m: list[tuple[float, float]] | None = Field(None, description="Floor positions [x, y] in metres (the layout's frame) of the marks in image_px.")
    anchor: Literal["center", "bottom"] = Field("center", description="A box's floor point: center (camera looking straight down) or bottom (oblique view: the feet).")
    image_size: tuple[int, int] | None = Field(None, description="Image width and height, to check the homography maps the image's corners in front of the camera.")
    interval_s: float = Field(0.0, ge=0, le=10, description="Publish at most this often (0: every processed frame, what the floor pipeline's ticks want).")

    def _check(self) -> None:
        """One homography, given or fitted from floor marks, that maps the image in front of the camera."""
        marks = self.image_px is not None or self.floor_m is not None
        if (self.homography is None) == (not marks):
            raise ValueError("give either homography (a 3x3 matrix) or image_px and floor_m (4 or more floor marks), not both or neither")
        if marks:
            if self.image_px is None or self.floor_m is None:
                raise ValueError("image_px and floor_m go together: the image points of floor marks and their floor positions")
            if len(self.image_px) != len(self.floor_m):
                raise ValueError(f"image_px has {len(self.image_px)} points and floor_m {len(self.floor_m)}; they pair up one to one")
            if len(self.image_px) < 4:
                raise ValueError(f"a homography needs at least 4 floor marks (image_px/floor_m pairs), got {len(self.image_px)}")
        self.view("camera")  # fit and check it now: a bad calibration is a config error, not a failure at run time

    def view(self, camera: str) -> Any:
        """Return this camera's ``vision.multiview.FloorView`` (numpy and the tracker side are imported here, not at config load)."""
        from pydantic import ValidationError

        from vision.multiview import FloorView

        try:
            if self.homography is not None:
                v = FloorView(camera=camera, homography=self.homography, anchor=self.anchor, image_size=self.image_size)
            else:
                assert self.image_px is not None and self.floor_m is not None
                v = FloorView.from_points(camera, self.image_px, self.floor_m, anchor=self.anchor, image_size=self.image_size)
        except ValidationError as exc:
            hint = "" if self.homography is not None else "; the floor marks fit none: use 4 or more marks, no three of them on one line"
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()) + hint) from None
        if self.image_size is not None:
            import numpy as np

            w, h = self.image_size
            q = np.c_[np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64), np.ones(4)] @ np.array(v.homography).T
            if not (np.sign(q[:, 2]) == np.sign(q[0, 2])).all():
                raise ValueError("the homography maps part of the image beyond the horizon (its corners land on both sides of the floor's line at infinity); check the floor marks")
        return v


class Config(PipelineConfigBase):
    """A camera processed on this node."""

    type: Literal["vision"] = Field(description="Pipeline type: a camera through detect, track and zone events.")
    source: str = Field(min_length=1, description="Video file, rtsp:// or http:// URL, or V4L2 device (/dev/video0 or an index).")
    model: str = Field(min_length=1, description="Model package directory (model.onnx + model.json), e.g. from 'shopfleet vision fetch-model'.")
    zones: str = Field(min_length=1, description="Zones YAML of this camera (door line, shelf polygons); see docs/vision.md.")
    camera: str | None = Field(None, description="Camera name in events and readings (default: 'camera' from the zones file).")
    threads: int = Field(0, ge=0, le=64, description="ONNX Runtime threads (0 = all cores). On a node with several cameras, split the cores.")
    providers: list[str] | None = Field(
        None, description="Allowed execution providers, best first: tensorrt, cuda, openvino, coreml, cpu (default: all present; CPU always last)."
    )
    score_threshold: float | None = Field(None, gt=0, lt=1, description="Detection score threshold (default: the model package's).")
    live: bool | None = Field(
        None, description="Newest-frame mode with reconnects (default: true for cameras and streams, false for files)."
    )
    reconnect_initial_s: float = Field(0.5, gt=0, le=60, description="First wait before reopening a failed stream; doubles per failure.")
    reconnect_max_s: float = Field(10.0, gt=0, le=600, description="Longest wait between reopen attempts.")
    occupancy_interval_s: float = Field(
        5.0, gt=0, le=3600, description="Send the occupancy reading at least this often. Shorter gives smoother charts, longer less telemetry."
    )
    dark_after_s: float = Field(
        10.0, gt=0, le=3600, description="Raise the camera_dark alert when no frame arrived for this long. Lower alerts sooner, but on brief stream hiccups too."
    )
    tracker: TrackerConfig = Field(default_factory=TrackerConfig, description="Tracker tuning (see docs/vision.md).")
    gate_interval_s: float = Field(
        2.0, gt=0, le=3600, description="Report gate metrics (vision_fps, ...) this often; the heartbeat sends the newest."
    )
    tracks: TrackStream | None = Field(None, description="Publish track positions for fusion on the shop broker (off when unset).")
    detections: DetectionStream | None = Field(
        None, description="Publish each frame's detections on the floor for a type: floor pipeline (several ceiling cameras; off when unset)."
    )


class VisionPipeline(OwnMetrics):
    """Run one camera under the agent's supervisor."""

    kind = "vision"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.name = config.name
        self._lock = threading.Lock()
        self._pipe: Any = None  # vision.pipeline.Pipeline while running
        self._errors: dict[str, int] = {}
        self._detail = "not started"
        self._dark = False
        self._registry: Any = None  # the pipeline's own metrics (shopfleet_vision_*), kept across restarts
        self._metrics: Any = None

    def _count(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + n

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Load model and zones, open the camera and relay its events until ``stop`` is set."""
        from vision.capture import Capture
        from vision.detector import OnnxDetector
        from vision.errors import VisionError
        from vision.model import load_package
        from vision.pipeline import Pipeline
        from vision.zones import load_zones

        cfg = self.config
        try:
            pkg = load_package(cfg.model)
            zones = load_zones(cfg.zones)
        except VisionError as exc:
            self._count(exc.reason)
            self._detail = str(exc)
            raise RuntimeError(f"pipelines[{cfg.name}]: {exc}") from None
        camera = cfg.camera or zones.camera
        detector = OnnxDetector(pkg, providers=cfg.providers, threads=cfg.threads, score_threshold=cfg.score_threshold, classes=["person"])
        cap = Capture(cfg.source, camera=camera, live=cfg.live, backoff_initial=cfg.reconnect_initial_s, backoff_max=cfg.reconnect_max_s)
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            from vision.metrics import VisionMetrics

            self._registry = CollectorRegistry()
            self._metrics = VisionMetrics(self._registry)
        pipe = Pipeline(detector, [(cap, zones)], tracker_config=cfg.tracker, metrics=self._metrics)
        with self._lock:
            self._pipe = pipe
        self._detail = f"{camera}: {pkg.manifest.name} {pkg.manifest.precision} on {detector.session.get_providers()[0]}"
        last_occupancy = [0.0]
        last_gates = [0.0]
        started = time.monotonic()

        def occupancy(value: int) -> None:
            sink.readings([Reading(name="occupancy", value=float(value), unit="people", source=camera)])
            last_occupancy[0] = time.monotonic()

        def on_events(events: list[Any]) -> None:
            for e in events:
                if e.kind == "occupancy":
                    occupancy(int(e.value))
                    continue
                data = {"camera": e.camera, "track_id": e.track_id, "zone": e.zone, **({"seconds": e.value} if e.value is not None else {}), **e.detail}
                sink.event(e.kind, camera, data, at=e.ts if cap.live else None)

        def on_tick() -> None:
            now = time.monotonic()
            if now - last_occupancy[0] >= cfg.occupancy_interval_s:
                occupancy(pipe.cams[camera].events.occupancy)
            if now - last_gates[0] >= cfg.gate_interval_s and pipe.frames > 0:
                last_gates[0] = now
                report_gates(pipe, sink)
            last = cap.stats().last_frame_monotonic
            dark = now - (last if last is not None else started) > cfg.dark_after_s
            if dark != self._dark:
                self._dark = dark
                state = "firing" if dark else "resolved"
                message = f"camera {camera} delivered no frame for {cfg.dark_after_s:g}s ({cap.stats().last_error or 'no error'})" if dark else f"camera {camera} delivers frames again"
                sink.alert("camera_dark", state, "warning", camera, message, {"source": cfg.source})

        publisher = TrackPublisher(cfg.tracks, camera, zones.anchor, self._count) if cfg.tracks is not None else None
        detections = DetectionPublisher(cfg.detections, camera, self._count) if cfg.detections is not None else None

        def on_frames(frames: list[Any]) -> None:
            for f in frames:
                ts = f.ts if cap.live else time.time()
                if publisher is not None:
                    publisher.frame(ts, pipe.cams[f.camera].last_tracks)
                if detections is not None:
                    detections.frame(ts, pipe.cams[f.camera].last_detections)

        try:
            if publisher is not None:
                publisher.start()
            if detections is not None:
                detections.start()
            pipe.run(stop, on_events=on_events, on_tick=on_tick, on_frames=on_frames)
        except VisionError as exc:
            self._count(exc.reason)
            self._detail = str(exc)
            raise RuntimeError(f"pipelines[{cfg.name}]: {exc}") from None
        finally:
            cap.close()
            if publisher is not None:
                publisher.stop()
            if detections is not None:
                detections.stop()
            with self._lock:  # fold this run's counts in, so errors_by_reason never decreases
                for reason, n in _counts(pipe).items():
                    self._errors[reason] = self._errors.get(reason, 0) + n
                self._pipe = None
        if not stop.is_set():
            self._detail = f"source {cfg.source} ended after {pipe.frames} frames"
            raise RuntimeError(self._detail)

    def health(self) -> dict[str, Any]:
        """Return fps, latency, dropped frames, age of the last frame and errors by reason."""
        with self._lock:
            pipe = self._pipe
            errors = dict(self._errors)
        out: dict[str, Any] = {"detail": self._detail}
        if pipe is None:
            out.update(errors=sum(errors.values()), errors_by_reason=errors)
            return out
        h = pipe.health()
        for reason, n in _counts(pipe).items():
            errors[reason] = errors.get(reason, 0) + n
        out.update(
            fps=h.fps,
            latency_ms=h.latency_ms_p50,
            dropped_frames=h.dropped_frames,
            last_frame_age_s=h.last_frame_age_s,
            errors=sum(errors.values()),
            errors_by_reason=errors,
        )
        out["detail"] = f"{self._detail}; {h.frames} frames, occupancy {h.occupancy}"
        return out


class _LocalStream:
    """One camera's QoS 0 stream to a shop-local topic, on a connection of its own to the shop broker.

    Nothing is queued while the broker is away, and a failed publish never stops the camera: it
    is counted under ``unpublished`` (an ``errors_by_reason`` key of the vision pipeline).
    """

    unpublished = ""

    def __init__(self, broker: BrokerConfig, client_id: str, topic: str, count: Any) -> None:
        from edge_agent.mqtt_core import ThreadedLink
        from edge_agent.pipelines.fusion import broker_settings

        self.topic = topic
        self._count = count
        self.link = ThreadedLink(broker_settings(broker, client_id), lambda m: None)

    def start(self) -> None:
        """Connect in the background (publishing waits for nothing)."""
        self.link.start()

    def stop(self) -> None:
        """Disconnect."""
        self.link.stop()

    def _send(self, body: bytes) -> None:
        if not self.link.connected:
            self._count(self.unpublished)
            return
        try:
            self.link.publish_nowait(self.topic, body, qos=0)
        except Exception as exc:  # never let the stream stop the camera
            self._count(self.unpublished)
            log.debug("%s on %s: publish failed: %s", self.unpublished, self.topic, exc)


class TrackPublisher(_LocalStream):
    """Throttled track positions of one camera, in floor metres, to the shop-local track topic.

    QoS 0: a lost position is replaced by the next one a tenth of a second later, and nothing of
    it is worth queueing while the shop broker is away. Ended track ids are kept until the next
    publish, so fusion learns of every lost track even when frames are skipped.
    """

    unpublished = "tracks_unpublished"

    def __init__(self, cfg: TrackStream, camera: str, anchor: str, count: Any) -> None:
        from edge_agent.pipelines.fusion import track_topic

        super().__init__(cfg.broker, f"tracks-{cfg.shop}-{camera}", track_topic(cfg.shop, cfg.node(), camera), count)
        self.cfg = cfg
        self.camera = camera
        self.anchor = anchor
        self._last = 0.0
        self._ended: list[int] = []

    def frame(self, ts: float, tracks: Any) -> None:
        """Take one frame's tracks; publish if ``interval_s`` has passed."""
        import json

        from vision.zones import anchor_points

        if tracks is None:
            return
        self._ended += list(tracks.ended)
        if ts - self._last < self.cfg.interval_s:
            return
        self._last = ts
        pts: Any = anchor_points(tracks.xyxy, self.anchor) if len(tracks) else []
        ox, oy = self.cfg.origin_px
        s = self.cfg.px_per_m
        body = {"camera": self.camera, "ts": round(ts, 3),
                "tracks": [[int(i), round((float(p[0]) - ox) / s, 3), round((float(p[1]) - oy) / s, 3)] for i, p in zip(tracks.ids.tolist(), pts, strict=True)],
                "ended": self._ended}
        self._ended = []
        self._send(json.dumps(body).encode())


class DetectionPublisher(_LocalStream):
    """Every processed frame's detections of one camera, projected to the floor, to the shop-local detection topic.

    QoS 0, like the track stream: a frame lost is one camera left out of one tick of the floor
    pipeline, which the merge copes with (the other views still see the floor). ``seq`` counts
    this camera's frames since the pipeline started, so the floor pipeline can tell a restart.
    """

    unpublished = "detections_unpublished"

    def __init__(self, cfg: DetectionStream, camera: str, count: Any) -> None:
        from edge_agent.pipelines.floor import detection_topic

        super().__init__(cfg.broker, f"detections-{cfg.shop}-{camera}", detection_topic(cfg.shop, cfg.node(), camera), count)
        self.cfg = cfg
        self.camera = camera
        self.view = cfg.view(camera)
        self._last = -float("inf")
        self.seq = 0

    def payload(self, ts: float, dets: Any) -> bytes:
        """Return the wire message of one frame's detections (image pixels) at ``ts``."""
        from vision.multiview import encode_frame, project

        self.seq += 1
        return encode_frame(self.camera, ts, self.seq, project(self.view, dets))

    def frame(self, ts: float, dets: Any) -> None:
        """Take one frame's detections; publish if ``interval_s`` has passed."""
        if dets is None or ts - self._last < self.cfg.interval_s:
            return
        self._last = ts
        self._send(self.payload(ts, dets))


def report_gates(pipe: Any, sink: EventSink) -> None:
    """Report :data:`GATE_METRICS` of a running ``vision.pipeline.Pipeline`` through ``sink``."""
    h = pipe.health()
    sink.gate_metric("vision_fps", float(h.fps), "lower")
    seen = h.frames + h.dropped_frames
    if seen:
        sink.gate_metric("vision_dropped_ratio", h.dropped_frames / seen, "higher")
    if h.frames:
        sink.gate_metric("vision_error_ratio", sum(_counts(pipe).values()) / h.frames, "higher")


def _counts(pipe: Any) -> dict[str, int]:
    """Return a running pipeline's error counts by reason: bad frames, reconnects, failed frames."""
    out: dict[str, int] = dict(pipe.errors)
    for st in pipe.cams.values():
        s = st.capture.stats()
        for reason, n in s.bad_frames.items():
            out[f"frame_{reason}"] = out.get(f"frame_{reason}", 0) + n
        if s.reconnects:
            out["reconnect"] = out.get("reconnect", 0) + s.reconnects
    return out


def build(config: Config) -> VisionPipeline:
    """Return the pipeline for a ``type: vision`` config entry."""
    return VisionPipeline(config)

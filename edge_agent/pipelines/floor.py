"""``type: floor``: one shop-wide tracker over a grid of ceiling cameras, as deployed on the GPU node.

**Inputs.** Each ceiling camera runs a ``type: vision`` pipeline with ``detections:`` set: every
processed frame's boxes, projected to the floor through that camera's homography, go to the
shop-local topic ``local/v1/{shop}/detections/{node}/{camera}`` (:func:`detection_topic`;
``vision.multiview.encode_frame``), where ``{node}`` is the node part of the publishing stream's
broker user ``<shop>.<node>``: the shop broker lets each node user write only under its own node,
so the topic says who published. This pipeline subscribes to all of them on the shop broker with
a connection (and broker user) of its own, takes each camera's frames only from the node its
``cameras:`` entry names (``node``), and checks every message (``vision.multiview.decode_frame``)
before it touches the tracker.

**Ticks.** Frames are grouped into ticks at ``tick_hz``: tick ``k`` is at ``k / tick_hz`` (data
time, the nodes' clocks, which the agents' clock beacon keeps in step). Each camera contributes
its frame closest to the tick within half a tick interval (a frame belongs to its nearest tick);
a camera with no frame in that window is left out of the tick, so it counts as not having
looked, not as having seen nobody (``MultiViewTracker.merge_floor``). A tick is closed, and
tracked, once the newest frame (capped at this node's clock) is ``latency_s`` past its window;
when nothing arrives for ``latency_s`` it closes on the wall clock's pace, so the last people
seen are still tracked out. A tick no camera delivered to is skipped (the tracker does not age
its tracks over a gap in which nobody looked). Ticks are fed in order, once: a frame for a tick
already closed is *late*, counted and dropped, never fed into history.

**Bad input** is counted by reason (``errors_by_reason`` and
``shopfleet_floor_frames_dropped_total{camera,reason}``), logged once per camera and reason at
warning level (then at debug), and never reaches the tracker: ``bad_json``, ``version``,
``schema`` (a malformed message), ``unknown_camera`` (not in ``cameras:``), ``wrong_node`` (a
configured camera's frame published under another node than its ``cameras[].node``: another
node's credentials, never tracked), ``camera_mismatch``
(the body names another camera than its topic), ``future`` (more than ``max_future_s`` ahead of
this node's clock: a wrong clock must not close everyone else's ticks), ``out_of_order`` (not
newer than the camera's previous frame), ``late``, ``flood`` (more than ``max_frames_per_tick``
frames of one camera for one tick) and ``inbox_full`` (more than ``inbox_max`` messages waiting).
Each check is per camera: a flooding or broken camera loses its own frames, the others go on.

**Output.** The merged tracks (``MultiViewTracker.update_floor``, ONE ``ByteTracker``: shop-wide
ids) go (a) to the track topic ``local/v1/{shop}/tracks/{node}/{camera}`` (``{node}``: the node
part of this pipeline's own broker user; ``camera`` defaults to ``floor``) in the format ``type:
fusion`` reads (``{"camera", "ts", "tracks": [[id, x_m, y_m]], "ended"}``), so fusion runs
unchanged with ``camera: floor`` and ``track_node`` that node; and (b) through
``vision.events.ZoneEvents`` on the zones drawn in the top view, to the agent's sink as a vision
pipeline's do: ``person_entered`` / ``person_exited`` / ``zone_enter`` / ``zone_exit`` /
``dwell`` events (source and ``data.camera`` = ``camera``), the ``occupancy`` reading, and the
gate metrics of :data:`GATE_METRICS`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter, deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_agent.config import BrokerConfig
from edge_agent.pipelines.fusion import (
    broker_settings,
    stream_node,
    track_topic,
)
from edge_agent.protocol import LocalStream, Reading, Topics, validate_id
from edge_agent.supervisor import EventSink, OwnMetrics, PipelineConfigBase
from vision.multiview import FloorDetections, FloorFrame, MergeConfig
from vision.tracker import TrackerConfig

log = logging.getLogger(__name__)

GATE_METRICS = {
    "floor_tick_rate": "ticks per second tracked (recent ticks); below tick_hz when cameras stall or the node is too slow",
    "floor_cameras_live_ratio": "cameras that delivered a frame within dark_after_s / cameras configured",
    "floor_late_ratio": "frames dropped as late (their tick already tracked) / frames received since the pipeline started",
}
"""Gate metrics this pipeline reports (name -> meaning); docs/agent.md lists them for policies."""

DROP_REASONS = ("bad_json", "version", "schema", "unknown_camera", "wrong_node", "camera_mismatch", "future", "out_of_order", "late", "flood", "inbox_full")
"""Why a detection message is dropped (``errors_by_reason`` keys and the metric's ``reason`` label)."""


def detection_topic(shop: str, node: str, camera: str) -> str:
    """Return the shop-local topic of a camera's detection stream: ``local/v1/{shop}/detections/{node}/{camera}``.

    ``node`` is the node part of the publisher's broker user (``fusion.stream_node``).
    """
    return Topics.local(shop, LocalStream.DETECTIONS, node, camera)


def detection_subscription(shop: str) -> str:
    """Return the subscription to every detection stream of a shop (every publisher's, every camera's)."""
    return Topics.local_filter(shop, LocalStream.DETECTIONS)


class FloorCamera(BaseModel):
    """One ceiling camera whose detection stream this pipeline merges."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    camera: str = Field(min_length=1, description="Camera name, as its vision pipeline publishes it (the topic's last level).")
    node: str = Field(
        min_length=1,
        description="Node part of the broker user ('<shop>.<node>') of the vision pipeline's detections: stream that publishes this "
        "camera: its frames are taken from local/v1/{shop}/detections/{node}/{camera} only; under any other node they are dropped (wrong_node).",
    )
    coverage: list[tuple[float, float]] | None = Field(
        None, description="Floor polygon (metres) the camera sees people in, for the merge's lone-view doubt; unset: the camera counts nowhere."
    )

    @field_validator("camera")
    @classmethod
    def _id(cls, v: str) -> str:
        return validate_id(v, "camera name")

    @field_validator("node")
    @classmethod
    def _node(cls, v: str) -> str:
        return validate_id(v, "node (the node part of the camera's publishing user)")

    @field_validator("coverage")
    @classmethod
    def _polygon(cls, v: list[tuple[float, float]] | None) -> list[tuple[float, float]] | None:
        if v is not None and len(v) < 3:
            raise ValueError(f"coverage is a floor polygon: give at least 3 corners [x, y] in metres, got {len(v)}")
        return v


class Config(PipelineConfigBase):
    """Several ceiling cameras' detection streams, merged on the floor and tracked once."""

    type: Literal["floor"] = Field(description="Pipeline type: one shop-wide tracker over the ceiling cameras' detection streams.")
    shop: str = Field(min_length=1, description="Shop id whose detection streams to merge (this node's shop).")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="The shop broker, with a user of this pipeline's own (docs/fusion.md).")
    camera: str = Field("floor", min_length=1, description="Name of the merged view: the track topic's camera and the events' source (fusion's camera:).")
    zones: str = Field(min_length=1, description="Zones YAML drawn in the top view (merge.px_per_m, merge.origin_m), anchor: center (docs/vision.md).")
    cameras: list[FloorCamera] = Field(min_length=1, description="The ceiling cameras to merge, each with its floor coverage.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="How the views' detections become one set of people (docs/fusion.md, MergeConfig).")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig, description="Tracker tuning (docs/vision.md).")
    tick_hz: float = Field(10.0, gt=0, le=60, description="Ticks per second: the cameras' frame rate. Each camera's frame nearest a tick, within half a tick, joins it.")
    latency_s: float = Field(
        0.3, ge=0, le=10, description="Wait this long (data time) past a tick's window for slow cameras before tracking it; later frames are dropped as late."
    )
    max_future_s: float = Field(1.0, gt=0, le=60, description="Drop a frame stamped more than this ahead of this node's clock (a wrong clock).")
    max_frames_per_tick: int = Field(3, ge=1, le=100, description="Frames of one camera for one tick beyond this are a flood, dropped.")
    inbox_max: int = Field(20000, ge=100, description="Messages waiting to be read beyond this are dropped (inbox_full).")
    dark_after_s: float = Field(5.0, gt=0, le=3600, description="A camera with no frame for this long is not live (floor_cameras_live_ratio, health).")
    occupancy_interval_s: float = Field(5.0, gt=0, le=3600, description="Send the occupancy reading at least this often.")
    gate_interval_s: float = Field(2.0, gt=0, le=3600, description="Report the gate metrics (floor_tick_rate, ...) this often.")
    publish_tracks: bool = Field(
        True, description="Publish the merged tracks on local/v1/{shop}/tracks/{node}/{camera} for type: fusion ({node}: the node part of broker.username, which must be set)."
    )

    @field_validator("shop", "camera")
    @classmethod
    def _ids(cls, v: str) -> str:
        return validate_id(v, "name")

    @field_validator("cameras")
    @classmethod
    def _unique(cls, v: list[FloorCamera]) -> list[FloorCamera]:
        names = [c.camera for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"camera names must be unique; repeated: {dup}")
        return v

    @model_validator(mode="after")
    def _publisher(self) -> Config:
        if self.publish_tracks:
            self.track_node()
        return self

    def track_node(self) -> str:
        """Return the node its track topic carries: the node part of ``broker.username`` (``ValueError`` if unset or another shop's)."""
        return stream_node(self.broker.username, self.shop, "broker.username (the track stream's publisher)")


class TickAssembler:
    """Group the cameras' floor frames into ticks; pure (no I/O, no wall clock of its own), so it is tested directly.

    :meth:`add` takes one frame and returns None (kept) or the reason it was dropped;
    :meth:`close` returns the ticks whose window ended by a horizon, in order, each as
    ``(tick ts, {camera: FloorDetections})`` with each camera's frame nearest the tick.
    """

    def __init__(self, cameras: list[str], tick_hz: float, max_frames_per_tick: int = 3, max_future_s: float = 1.0) -> None:
        self.cameras = set(cameras)
        self.hz = tick_hz
        self.half = 0.5 / tick_hz
        self.max_frames = max_frames_per_tick
        self.max_future = max_future_s
        self.pending: dict[int, dict[str, FloorFrame]] = {}
        self.counts: Counter[tuple[int, str]] = Counter()
        self.closed: int | None = None  # index of the last tick closed
        self.last_ts: dict[str, float] = {}
        self.newest = -float("inf")

    def add(self, frame: FloorFrame, now: float) -> str | None:
        """Keep ``frame`` for its tick; return None, or the reason it was dropped (see the module docstring)."""
        cam, ts = frame.camera, frame.ts
        if cam not in self.cameras:
            return "unknown_camera"
        if ts > now + self.max_future:
            return "future"
        last = self.last_ts.get(cam)
        if last is not None and ts <= last:
            return "out_of_order"
        k = round(ts * self.hz)
        if self.closed is not None and k <= self.closed:
            self.last_ts[cam] = ts  # it is the camera's newest frame all the same: an older one after it is out of order
            return "late"
        self.counts[(k, cam)] += 1
        if self.counts[(k, cam)] > self.max_frames:
            return "flood"
        self.last_ts[cam] = ts
        self.newest = max(self.newest, ts)
        tick = self.pending.setdefault(k, {})
        best = tick.get(cam)
        if best is None or abs(ts - k / self.hz) < abs(best.ts - k / self.hz):
            tick[cam] = frame
        return None

    def close(self, horizon: float) -> list[tuple[float, dict[str, FloorDetections]]]:
        """Return the ticks whose window ended by ``horizon`` (data time), oldest first; later frames for them are late."""
        last = math.floor((horizon - self.half) * self.hz + 1e-9) if horizon > -float("inf") else None
        if last is None or (self.closed is not None and last <= self.closed):
            return []
        out = [(k / self.hz, {c: f.detections for c, f in sorted(self.pending.pop(k).items())}) for k in sorted(k for k in self.pending if k <= last)]
        self.closed = last
        for key in [key for key in self.counts if key[0] <= last]:
            del self.counts[key]
        return out


class FloorPipeline(OwnMetrics):
    """Run the shop-wide multi-camera tracker under the agent's supervisor (its own metrics: ``shopfleet_floor_*``)."""

    kind = "floor"

    def __init__(self, config: Config, clock: Any = time.time) -> None:
        self.config = config
        self.name = config.name
        self.clock = clock
        self._lock = threading.Lock()
        self._errors: Counter[str] = Counter()
        self._detail = "not started"
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._wake = threading.Event()
        self._logged: set[tuple[str, str]] = set()
        self._ticks: deque[float] = deque(maxlen=50)  # monotonic time of recent ticks, for the tick rate
        self._latency_ms: deque[float] = deque(maxlen=200)
        self._seen_at: dict[str, float] = {}  # camera -> monotonic time of its last accepted frame
        self._nodes = {c.camera: c.node for c in config.cameras}  # camera -> the node whose user publishes it
        self._started = time.monotonic()
        self.stats: Counter[str] = Counter()  # frames_received, frames_accepted, late, ticks, ticks_cameras, events
        self.tracker: Any = None
        self.events: Any = None
        self._registry: Any = None
        self._metrics: Any = None

    # ----- intake (network thread: hand off only) ---------------------------------------------

    def _on_message(self, msg: Any) -> None:
        if len(self._inbox) >= self.config.inbox_max:
            self._drop(msg.topic.rsplit("/", 1)[-1], "inbox_full", "the pipeline is behind")
            return
        self._inbox.append((msg.topic, msg.payload))
        self._wake.set()

    def _drop(self, camera: str, reason: str, detail: str) -> None:
        known = camera in self._seen_at or any(c.camera == camera for c in self.config.cameras)
        label = camera if known else "_unknown"
        with self._lock:
            self._errors[reason] += 1
        if self._metrics is not None:
            self._metrics["dropped"].labels(label, reason).inc()
        key = (label, reason)
        level = logging.DEBUG if key in self._logged else logging.WARNING
        self._logged.add(key)
        log.log(level, "floor %s: dropped a detection frame of camera %s (%s): %s%s", self.name, camera, reason, detail,
                "" if level == logging.DEBUG else "; further ones of this camera and reason are logged at debug level")

    def take(self, topic: str, payload: bytes, assembler: TickAssembler, now: float) -> None:
        """Decode one message and hand it to the assembler, counting what is dropped and why."""
        from vision.multiview import WireError, decode_frame

        where = Topics.parse_local(topic)
        node, camera = where if where is not None else ("", topic.rsplit("/", 1)[-1])
        with self._lock:
            self.stats["frames_received"] += 1
        if camera not in assembler.cameras:
            self._drop(camera, "unknown_camera", f"not among cameras: {sorted(assembler.cameras)}")
            return
        bound = self._nodes.get(camera)
        if node != bound:
            # Only node `node`'s broker user can publish under it (the shop broker's ACL), and it is not the
            # publisher this camera is bound to: forged or misconfigured, its frames never reach the tracker.
            self._drop(camera, "wrong_node", f"came from node {node!r} ({topic}), but cameras[].node is {bound!r}")
            return
        try:
            frame = decode_frame(payload)
        except WireError as exc:
            self._drop(camera, exc.reason, str(exc))
            return
        if frame.camera != camera:
            self._drop(camera, "camera_mismatch", f"the message names camera {frame.camera!r} but came on {topic}")
            return
        reason = assembler.add(frame, now)
        if reason is not None:
            detail = {
                "future": f"stamped {frame.ts - now:.2f}s ahead of this node's clock (max_future_s {self.config.max_future_s:g})",
                "out_of_order": f"ts {frame.ts:.3f} not newer than the camera's previous frame",
                "late": f"ts {frame.ts:.3f}: its tick was already tracked (latency_s {self.config.latency_s:g})",
                "flood": f"more than {self.config.max_frames_per_tick} frames for the tick at {round(frame.ts * self.config.tick_hz) / self.config.tick_hz:.3f}",
            }.get(reason, reason)
            if reason == "late":
                with self._lock:
                    self.stats["late"] += 1
            self._drop(camera, reason, detail)
            return
        self._seen_at[camera] = time.monotonic()
        with self._lock:
            self.stats["frames_accepted"] += 1
        if self._metrics is not None:
            self._metrics["frames"].labels(camera).inc()

    # ----- the loop ---------------------------------------------------------------------------

    def _make_metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Gauge, Histogram
        from prometheus_client import Counter as PCounter

        reg = CollectorRegistry()
        buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
        self._registry = reg
        self._metrics = {
            "frames": PCounter("shopfleet_floor_frames_total", "Detection frames accepted, by camera", ["camera"], registry=reg),
            "dropped": PCounter("shopfleet_floor_frames_dropped_total", "Detection frames dropped, by camera and reason", ["camera", "reason"], registry=reg),
            "ticks": PCounter("shopfleet_floor_ticks_total", "Ticks tracked", registry=reg),
            "tick_seconds": Histogram("shopfleet_floor_tick_seconds", "CPU time per tick: merge, track, zone events", buckets=buckets, registry=reg),
            "cameras_per_tick": Gauge("shopfleet_floor_tick_cameras", "Cameras that delivered a frame to the last tick", registry=reg),
            "live": Gauge("shopfleet_floor_cameras_live", "Cameras that delivered a frame within dark_after_s", registry=reg),
            "events": PCounter("shopfleet_floor_events_total", "Shop events emitted, by kind", ["kind"], registry=reg),
            "occupancy": Gauge("shopfleet_floor_occupancy", "People inside the shop as counted at the door line of the top view", registry=reg),
        }

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Subscribe to the cameras' detection streams and track until ``stop``; events go through ``sink``."""
        from edge_agent.mqtt_core import ThreadedLink
        from vision.errors import VisionError
        from vision.events import ZoneEvents
        from vision.multiview import MultiViewTracker
        from vision.zones import load_zones

        cfg = self.config
        try:
            zones = load_zones(cfg.zones)
        except VisionError as exc:
            with self._lock:
                self._errors[exc.reason] += 1
            self._detail = str(exc)
            raise RuntimeError(f"pipelines[{cfg.name}]: {exc}") from None
        if zones.anchor != "center":
            self._detail = f"zones {cfg.zones}: anchor is {zones.anchor}; the floor pipeline's zones are drawn in the top view, where a person is the box centre: set anchor: center"
            raise RuntimeError(f"pipelines[{cfg.name}]: {self._detail}")
        if self._registry is None:
            self._make_metrics()
        m = self._metrics
        tracker = MultiViewTracker.on_floor({c.camera: c.coverage for c in cfg.cameras}, cfg.merge, cfg.tracker)
        events = ZoneEvents(zones, camera=cfg.camera)
        self.tracker, self.events = tracker, events
        assembler = TickAssembler([c.camera for c in cfg.cameras], cfg.tick_hz, cfg.max_frames_per_tick, cfg.max_future_s)
        self._inbox.clear()
        link = ThreadedLink(broker_settings(cfg.broker, f"floor-{cfg.shop}-{cfg.name}"), self._on_message, subscriptions=(detection_subscription(cfg.shop),),
                            reconnect_min_s=max(1, int(cfg.broker.reconnect_min_s)), reconnect_max_s=max(1, int(cfg.broker.reconnect_max_s)))
        topic = track_topic(cfg.shop, cfg.track_node(), cfg.camera) if cfg.publish_tracks else ""
        link.start()
        self._detail = f"{cfg.camera}: merging {len(cfg.cameras)} cameras of shop {cfg.shop} from {cfg.broker.host}:{cfg.broker.port}"
        arrived = time.monotonic()
        last_occupancy = last_gate = 0.0
        ended: list[int] = []
        try:
            while not stop.is_set():
                self._wake.wait(min(0.05, 0.5 / cfg.tick_hz))
                self._wake.clear()
                now = self.clock()
                while self._inbox:
                    t, payload = self._inbox.popleft()
                    arrived = time.monotonic()
                    self.take(t, payload, assembler, now)
                idle = time.monotonic() - arrived
                newest = min(assembler.newest, now)
                horizon = newest - cfg.latency_s if idle < cfg.latency_s else newest + idle - cfg.latency_s
                for ts, frames in assembler.close(horizon):
                    if not frames:
                        continue
                    ended = self._tick(ts, frames, sink, link, topic, ended)
                mono = time.monotonic()
                live = sum(1 for c in cfg.cameras if mono - self._seen_at.get(c.camera, -1e9) <= cfg.dark_after_s)
                m["live"].set(live)
                if mono - last_occupancy >= cfg.occupancy_interval_s:
                    last_occupancy = mono
                    sink.readings([Reading(name="occupancy", value=float(events.occupancy), unit="people", source=cfg.camera)])
                if mono - last_gate >= cfg.gate_interval_s and self.stats["ticks"]:
                    last_gate = mono
                    self.report_gates(sink)
        finally:
            link.stop()

    def _tick(self, ts: float, frames: dict[str, FloorDetections], sink: EventSink, link: Any, topic: str, ended: list[int]) -> list[int]:
        """Track one tick, emit its events and publish its tracks; return the ended ids not published yet."""
        cfg = self.config
        m = self._metrics
        t0 = time.thread_time()
        tracks, _ = self.tracker.update_floor(frames, ts=ts)
        evs = self.events.update(tracks)
        xy = self.tracker.to_floor(tracks.xyxy)
        cpu = time.thread_time() - t0
        m["tick_seconds"].observe(cpu)
        m["ticks"].inc()
        m["cameras_per_tick"].set(len(frames))
        self._ticks.append(time.monotonic())
        self._latency_ms.append((self.clock() - ts) * 1000)
        with self._lock:
            self.stats["ticks"] += 1
            self.stats["ticks_cameras"] += len(frames)
            self.stats["cpu_us"] += int(cpu * 1e6)
        for e in evs:
            m["events"].labels(e.kind).inc()
            if e.kind == "occupancy":
                m["occupancy"].set(float(e.value))
                sink.readings([Reading(name="occupancy", value=float(e.value), unit="people", source=cfg.camera)])
                continue
            data = {"camera": e.camera, "track_id": e.track_id, "zone": e.zone, **({"seconds": e.value} if e.value is not None else {}), **e.detail}
            sink.event(e.kind, cfg.camera, data, at=e.ts)
        if not cfg.publish_tracks:
            return []
        pending = ended + [int(i) for i in tracks.ended]
        body = {"camera": cfg.camera, "ts": round(ts, 3),
                "tracks": [[int(i), round(float(p[0]), 3), round(float(p[1]), 3)] for i, p in zip(tracks.ids.tolist(), xy, strict=True)],
                "ended": pending}
        if not link.connected:
            with self._lock:
                self._errors["tracks_unpublished"] += 1
            return pending[-1000:]  # fusion learns of them with the next message that goes out
        try:
            link.publish_nowait(topic, json.dumps(body, separators=(",", ":")).encode(), qos=0)
        except Exception as exc:  # never let the track stream stop the tracker
            with self._lock:
                self._errors["tracks_unpublished"] += 1
            log.debug("floor %s: track publish failed: %s", self.name, exc)
            return pending[-1000:]
        return []

    # ----- reporting --------------------------------------------------------------------------

    def tick_rate(self) -> float:
        """Return ticks per second over the recent ticks (0 before two)."""
        t = list(self._ticks)
        return (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else 0.0

    def cameras_live(self) -> int:
        """Return how many configured cameras delivered a frame within ``dark_after_s``."""
        now = time.monotonic()
        return sum(1 for c in self.config.cameras if now - self._seen_at.get(c.camera, -1e9) <= self.config.dark_after_s)

    def report_gates(self, sink: EventSink) -> None:
        """Report :data:`GATE_METRICS` through ``sink``."""
        sink.gate_metric("floor_tick_rate", round(self.tick_rate(), 3), "lower")
        sink.gate_metric("floor_cameras_live_ratio", self.cameras_live() / len(self.config.cameras), "lower")
        with self._lock:
            received, late = self.stats["frames_received"], self.stats["late"]
        if received:
            sink.gate_metric("floor_late_ratio", late / received, "higher")

    def health(self) -> dict[str, Any]:
        """Return tick rate (as fps), latency, dropped frames, age of the newest frame and errors by reason."""
        import statistics

        with self._lock:
            errors = dict(self._errors)
            stats = dict(self.stats)
        ticks = stats.get("ticks", 0)
        seen = [t for t in self._seen_at.values()]
        out: dict[str, Any] = {
            "fps": round(self.tick_rate(), 2),
            "latency_ms": round(statistics.median(self._latency_ms), 2) if self._latency_ms else 0.0,
            "dropped_frames": sum(errors.get(r, 0) for r in DROP_REASONS),
            "last_frame_age_s": round(time.monotonic() - max(seen), 3) if seen else None,
            "errors": sum(errors.values()),
            "errors_by_reason": errors,
        }
        occupancy = self.events.occupancy if self.events is not None else 0
        per_tick = stats.get("ticks_cameras", 0) / ticks if ticks else 0.0
        out["detail"] = (f"{self._detail}; {self.cameras_live()}/{len(self.config.cameras)} cameras live, {ticks} ticks "
                         f"({per_tick:.1f} cameras a tick), occupancy {occupancy}")
        return out


def build(config: Config) -> FloorPipeline:
    """Return the pipeline for a ``type: floor`` config entry."""
    return FloorPipeline(config)

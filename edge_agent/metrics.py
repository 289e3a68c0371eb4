"""Prometheus metrics of the node agent, on a registry the caller passes in.

Every agent object gets its own registry (client_python's ``registry=`` argument), so the demo
can run many agents in one process and a test can read exactly one agent's counters. Names follow
``shopfleet_agent_<thing>_total`` / ``_seconds`` / ``_bytes``; docs/agent.md lists them all.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.supervisor import PIPELINE_STATES

log = logging.getLogger(__name__)


class AgentMetrics:
    """All metrics of one agent."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.outbox_depth = Gauge(
            "shopfleet_agent_outbox_depth", "Messages in the outbox waiting for a broker acknowledgement.", ["priority"], registry=r
        )
        self.outbox_bytes = Gauge("shopfleet_agent_outbox_bytes", "Payload bytes in the outbox.", registry=r)
        self.enqueued = Counter("shopfleet_agent_messages_enqueued_total", "Uplink messages stored in the outbox.", ["kind"], registry=r)
        self.sent = Counter(
            "shopfleet_agent_messages_sent_total", "Uplink messages the broker acknowledged (QoS 1 PUBACK).", ["kind"], registry=r
        )
        self.resent = Counter(
            "shopfleet_agent_messages_resent_total",
            "Messages sent again because the controller had not confirmed them uplink.ack_timeout_s after sending (uplink.ack: controller).",
            registry=r,
        )
        self.evicted = Counter(
            "shopfleet_agent_outbox_evicted_total", "Messages dropped from a full outbox, by priority.", ["priority"], registry=r
        )
        self.reconnects = Counter("shopfleet_agent_reconnects_total", "Connections to the broker after the first.", registry=r)
        self.connect_failures = Counter(
            "shopfleet_agent_connect_failures_total", "Failed connection attempts, by reason.", ["reason"], registry=r
        )
        self.publishes_refused = Counter(
            "shopfleet_agent_publishes_refused_total",
            "Publishes the broker refused (MQTT 5 PUBACK reason code >= 0x80, e.g. not_authorized: its ACL), by reason; "
            "each such outbox message is dropped, never retried.", ["reason"], registry=r,
        )
        self.subscriptions_refused = Counter(
            "shopfleet_agent_subscriptions_refused_total", "Subscriptions the broker refused (SUBACK failure), by reason.", ["reason"], registry=r,
        )
        self.connected = Gauge("shopfleet_agent_connected", "1 while connected to the broker.", registry=r)
        self.last_ack_age = Gauge(
            "shopfleet_agent_last_ack_age_seconds", "Seconds since the broker last acknowledged a message (-1: never).", registry=r
        )
        self.downlink_received = Counter(
            "shopfleet_agent_downlink_received_total", "Valid messages received from the controller, by kind.", ["kind"], registry=r
        )
        self.downlink_rejected = Counter(
            "shopfleet_agent_downlink_rejected_total", "Downlink messages dropped, by reason.", ["reason"], registry=r
        )
        self.commands = Counter("shopfleet_agent_commands_total", "Commands handled, by name and outcome.", ["name", "outcome"], registry=r)
        self.desired_states = Counter(
            "shopfleet_agent_desired_states_total", "Desired states passed to the handler, by outcome.", ["outcome"], registry=r
        )
        self.heartbeats = Counter("shopfleet_agent_heartbeats_total", "Heartbeats enqueued.", registry=r)
        self.pipeline_restarts = Counter(
            "shopfleet_agent_pipeline_restarts_total", "Restarts of a supervised pipeline.", ["pipeline"], registry=r
        )
        self.pipeline_state = Enum(
            "shopfleet_agent_pipeline_state", "Supervisor state of a pipeline.", ["pipeline"], states=list(PIPELINE_STATES), registry=r
        )
        self.sink_rejected = Counter(
            "shopfleet_agent_sink_rejected_total",
            "Events, alerts or readings from a pipeline that were invalid and dropped, by reason.",
            ["pipeline", "reason"],
            registry=r,
        )
        self.controller_online = Gauge(
            "shopfleet_agent_controller_online", "1 if the controller's retained presence says online, 0 if offline, -1 unknown.", registry=r
        )
        self.controller_online.set(-1)
        self.clock_offset = Gauge(
            "shopfleet_agent_clock_offset_seconds", "Controller clock minus node clock, estimated from beacons.", registry=r
        )

    def watch_pipelines(self, pipelines: Callable[[], dict[str, Any]], health: Callable[[Any], dict[str, Any]]) -> None:
        """Export the supervised pipelines at scrape time: their health (errors by reason, fps, latency,
        dropped frames, last-frame age) and the metrics pipelines collect themselves.

        ``pipelines()`` returns the pipeline objects by name; ``health(pipeline)`` one's health dict.
        """
        self.registry.register(_PipelineHealth(lambda: {name: health(p) for name, p in pipelines().items()}))
        self.registry.register(PipelineCollectors(pipelines))


# health key -> (metric name, help); gauges read from each pipeline's health() at scrape time
HEALTH_GAUGES = {
    "fps": ("shopfleet_agent_pipeline_fps", "Frames (or sensor frames) per second a pipeline processes."),
    "latency_ms": ("shopfleet_agent_pipeline_latency_seconds", "Processing latency of a pipeline's latest frame."),
    "last_frame_age_s": ("shopfleet_agent_pipeline_last_frame_age_seconds", "Seconds since a pipeline's newest frame or reading."),
}


class _PipelineHealth(Collector):
    def __init__(self, health_by_pipeline: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self._health = health_by_pipeline

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        health = self._health()
        errors = CounterMetricFamily(
            "shopfleet_agent_pipeline_errors", "Errors a pipeline counted itself, by reason.", labels=["pipeline", "reason"]
        )
        dropped = CounterMetricFamily(
            "shopfleet_agent_pipeline_dropped_frames", "Frames a pipeline dropped (stale or lost) since it last started.", labels=["pipeline"]
        )
        gauges = {key: GaugeMetricFamily(name, doc, labels=["pipeline"]) for key, (name, doc) in HEALTH_GAUGES.items()}
        for name, raw in health.items():
            by_reason = raw.get("errors_by_reason") or {}
            if isinstance(by_reason, dict):
                for reason, count in by_reason.items():
                    errors.add_metric([name, str(reason)], float(count))
            for key, family in gauges.items():
                value = raw.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([name], float(value) / 1000.0 if key == "latency_ms" else float(value))
            value = raw.get("dropped_frames")
            if isinstance(value, int) and not isinstance(value, bool):
                dropped.add_metric([name], float(value))
        yield errors
        yield dropped
        yield from gauges.values()


class PipelineCollectors(Collector):
    """Re-export the metrics pipelines collect themselves (``shopfleet_hardware_*``, ``shopfleet_vision_*``).

    A pipeline object that has a ``collect()`` method is a Prometheus collector. Each of its
    samples gets a ``pipeline`` label, so two sensor boards on one node never produce the same
    series, and families of the same name from several pipelines are merged into one.
    """

    def __init__(self, pipelines: Callable[[], dict[str, Any]]) -> None:
        self._pipelines = pipelines

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for name, pipeline in self._pipelines().items():
            collect = getattr(pipeline, "collect", None)
            if not callable(collect):
                continue
            try:
                families = list(collect())
            except Exception:
                log.exception("pipeline %s: collecting its metrics failed", name)
                continue
            for fam in families:
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for sample in fam.samples:
                    labels = {**sample.labels, "pipeline": name}
                    out.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
        yield from merged.values()

    def describe(self) -> list[Metric]:
        return []


HealthCheck = Callable[[], list[str]]
"""Return what is wrong with the process, one reason per entry; an empty list means healthy."""


def agent_liveness(agent: Any) -> list[str]:
    """Return the reasons ``agent`` is not alive: its uplink thread, worker threads or a pipeline's supervising thread died.

    A thread that was never started (``None``) is not a failure: the agent is still starting, or a
    test drives that part by hand. A pipeline the supervisor gave up on keeps its thread only until
    it reports ``failed``; that is reported too, since the pod restarting is the remaining cure.
    """
    problems: list[str] = []
    uplink = getattr(getattr(agent, "uplink", None), "_thread", None)
    if uplink is not None and not uplink.is_alive():
        problems.append("uplink thread is not running")
    for t in getattr(agent, "_threads", ()):
        if not t.is_alive():
            problems.append(f"worker thread {t.name} is not running")
    supervisor = getattr(agent, "supervisor", None)
    for name, runner in (getattr(supervisor, "runners", None) or {}).items():
        thread = getattr(runner, "_thread", None)
        if getattr(runner, "state", None) == "failed":
            problems.append(f"pipeline {name} failed (its restart budget is spent)")
        elif thread is not None and not thread.is_alive() and getattr(runner, "state", None) != "stopped":
            problems.append(f"supervisor thread of pipeline {name} is not running")
    return problems


class _Handler(BaseHTTPRequestHandler):
    """``GET /metrics`` (the registry, Prometheus text format) and ``GET /healthz`` (liveness, JSON)."""

    registry: CollectorRegistry
    health: HealthCheck | None

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.registry))
        elif path == "/healthz":
            try:
                problems = self.health() if self.health is not None else []
            except Exception as exc:  # a broken check must answer, not hang the probe
                log.exception("health check failed")
                problems = [f"health check raised {type(exc).__name__}: {exc}"]
            status, body = (503, {"status": "unhealthy", "problems": problems}) if problems else (200, {"status": "ok"})
            self._send(status, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "application/json", json.dumps({"error": f"no such path {path}: try /metrics or /healthz"}).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes and scrapes every few seconds would flood the agent's log.
        log.debug("metrics http: " + format, *args)


class MetricsServer:
    """The agent's HTTP endpoint: ``/metrics`` of one registry and ``/healthz``; ``port=0`` in config means none is started.

    A small ``http.server`` rather than prometheus_client's ``start_http_server``, because the
    kubelet's probes need an answer that says whether the agent's threads live, not merely that a
    scrape works (a dead uplink thread still serves metrics).
    """

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "0.0.0.0", health: HealthCheck | None = None) -> None:
        handler = type("MetricsHandler", (_Handler,), {"registry": registry, "health": staticmethod(health) if health else None})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="agent-metrics-http", daemon=True)
        self._thread.start()
        self.port = self._server.server_port

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

"""The node agent: outbox, uplink, heartbeats, pipelines, commands and desired state in one object.

:class:`Agent` is usable in two ways, both needed: ``shopfleet agent`` runs one per process on a
shop computer, and the demo runs dozens in one process (each with its own outbox file and its own
Prometheus registry, so nothing is global). Its threads:

* the uplink (``edge_agent.uplink``) owns the MQTT connection and drains the outbox;
* a ticker sends heartbeats and flushes each pipeline's batched readings as telemetry;
* a command worker runs command handlers (a slow handler never blocks the network loop);
* a desired-state worker hands the newest desired state to the rollout code (latest wins: a
  state superseded while the previous one was applying is skipped);
* one supervised thread per pipeline (``edge_agent.supervisor``).

Everything a node says goes through :meth:`Agent.send`, which fills in shop, node, epoch, seq
and time, so the rollout code reports with ``agent.send(ReportedState, revision=7, status="applied")``.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from edge_agent.clock import ClockOffsetEstimator
from edge_agent.commands import CommandGuard, CommandRefused, restart_pipeline
from edge_agent.config import AgentConfig
from edge_agent.facts import FactsProvider, OverriddenFacts, SystemFacts
from edge_agent.host import CommandHandler, DesiredStateHandler
from edge_agent.metrics import AgentMetrics, MetricsServer, agent_liveness
from edge_agent.mqtt import InMessage, MqttSettings, TlsSettings
from edge_agent.outbox import EvictedRange, Outbox, Priority
from edge_agent.pipelines import build_pipeline
from edge_agent.protocol import (
    ERROR_MAX_CHARS,
    MAX_EVICTED_RANGES,
    Alert,
    Channel,
    ClockBeacon,
    Command,
    CommandResult,
    ControllerPresence,
    DesiredState,
    Event,
    EvictedRun,
    Heartbeat,
    ProtocolError,
    Reading,
    StoredAck,
    Telemetry,
    Topics,
    Uplink,
    encode,
    parse_downlink,
)
from edge_agent.supervisor import (
    GATE_METRIC_PATTERN,
    Pipeline,
    PipelineConfigBase,
    PipelineRunner,
    Supervisor,
    Worse,
)
from edge_agent.uplink import UplinkLoop

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"

U = TypeVar("U", bound=Uplink)
__all__ = ["Agent", "AgentSink", "CommandHandler", "DesiredStateHandler", "ReadingBatcher", "mqtt_settings", "route"]

MAX_GATE_METRICS = 64
"""Most gate metric names one pipeline may report; more are counted and dropped."""
_GATE_NAME = re.compile(GATE_METRIC_PATTERN)


def route(kind: str, shop: str, node: str) -> tuple[str, Priority, bool]:
    """Return topic, outbox priority and retain flag of an uplink message kind."""
    if kind in ("heartbeat", "telemetry"):
        return Topics.node(shop, node, Channel.TELEMETRY), Priority.TELEMETRY, False
    if kind in ("event", "alert"):
        return Topics.node(shop, node, Channel.EVENTS), Priority.IMPORTANT, False
    if kind == "command_result":
        return Topics.node(shop, node, Channel.REPLIES), Priority.IMPORTANT, False
    if kind == "reported_state":
        return Topics.reported(shop, node), Priority.IMPORTANT, True
    raise ValueError(f"no route for uplink kind {kind!r}")


class ReadingBatcher:
    """Reduce readings per series (name, source, labels) over a window; thread-safe."""

    def __init__(self, reduce: str = "mean") -> None:
        self.reduce = reduce
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, tuple[tuple[str, str], ...]], tuple[Reading, list[float]]] = {}

    def add(self, readings: Sequence[Reading]) -> None:
        """Add readings to the current window."""
        with self._lock:
            for r in readings:
                key = (r.name, r.source, tuple(sorted(r.labels.items())))
                entry = self._series.get(key)
                if entry is None:
                    self._series[key] = (r, [r.value])
                else:
                    entry[1].append(r.value)

    def take(self) -> list[Reading]:
        """Return one reduced reading per series and start a new window."""
        with self._lock:
            series, self._series = self._series, {}
        out = []
        for first, values in series.values():
            if self.reduce == "last":
                value = values[-1]
            elif self.reduce == "min":
                value = min(values)
            elif self.reduce == "max":
                value = max(values)
            else:
                value = sum(values) / len(values)
            out.append(first.model_copy(update={"value": value}))
        return out


class AgentSink:
    """The EventSink a pipeline gets: events and alerts go to the outbox, readings are batched,
    gate metrics are kept for the next heartbeat."""

    def __init__(self, agent: Agent, pipeline: str, policy: PipelineConfigBase) -> None:
        self.agent = agent
        self.pipeline = pipeline
        self.batcher = ReadingBatcher(policy.telemetry_reduce)
        self.interval_s = policy.telemetry_interval_s
        self.next_flush = time.monotonic() + self.interval_s
        self._logged: set[str] = set()
        self._gate_lock = threading.Lock()
        self._gates: dict[str, tuple[float, Worse]] = {}

    def _reject(self, what: str, exc: Exception) -> None:
        reason = "invalid" if isinstance(exc, (ValidationError, ValueError, TypeError)) else "outbox_error"
        self.agent.metrics.sink_rejected.labels(self.pipeline, f"{what}_{reason}").inc()
        if what not in self._logged:
            self._logged.add(what)
            log.warning("pipeline %s sent an invalid %s, dropped (further ones only counted): %s", self.pipeline, what, exc)

    def event(self, type: str, source: str, data: dict[str, Any], at: float | None = None) -> None:
        """Send a shop event through the outbox."""
        try:
            self.agent.send(Event, type=type, source=source or self.pipeline, data=data or {}, at=at)
        except Exception as exc:
            self._reject("event", exc)

    def alert(self, name: str, state: str, severity: str, source: str, message: str = "", data: dict[str, Any] | None = None) -> None:
        """Send an alert through the outbox."""
        try:
            self.agent.send(Alert, name=name, state=state, severity=severity, source=source or self.pipeline, message=message, data=data or {})
        except Exception as exc:
            self._reject("alert", exc)

    def readings(self, readings: list[Reading]) -> None:
        """Batch readings; they leave as one telemetry message per window."""
        good = [r for r in readings if isinstance(r, Reading)]
        if len(good) != len(readings):
            self._reject("reading", TypeError("not a protocol.Reading"))
        self.batcher.add(good)

    def gate_metric(self, name: str, value: float, worse: Worse = "higher") -> None:
        """Keep ``value`` as this pipeline's current ``name`` for heartbeats (see EventSink.gate_metric)."""
        try:
            if not isinstance(name, str) or not _GATE_NAME.match(name):
                raise ValueError(f"gate metric name {name!r} does not match {GATE_METRIC_PATTERN}: use snake_case such as 'vision_fps'")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"gate metric {name} = {value!r} is not a finite number")
            if worse not in ("higher", "lower"):
                raise ValueError(f"gate metric {name}: worse={worse!r}, use 'higher' or 'lower'")
            with self._gate_lock:
                if name not in self._gates and len(self._gates) >= MAX_GATE_METRICS:
                    raise ValueError(f"more than {MAX_GATE_METRICS} gate metric names: report fewer")
                self._gates[name] = (float(value), worse)
        except ValueError as exc:
            self._reject("gate_metric", exc)

    def gate_metrics(self) -> dict[str, tuple[float, Worse]]:
        """Return this pipeline's current gate metrics: name -> (value, which direction is worse)."""
        with self._gate_lock:
            return dict(self._gates)

    def clear_gate_metrics(self) -> None:
        """Forget the gate metrics (the pipeline stopped running; its last figures no longer hold)."""
        with self._gate_lock:
            self._gates.clear()

    def flush(self) -> None:
        """Send the reduced readings of the window that ended, in chunks the protocol accepts."""
        self.next_flush = time.monotonic() + self.interval_s
        batch = self.batcher.take()
        for i in range(0, len(batch), 1000):
            self.agent.send(Telemetry, readings=tuple(batch[i : i + 1000]))


def mqtt_settings(config: AgentConfig) -> MqttSettings:
    """Turn the broker section of an AgentConfig into MqttSettings."""
    b = config.broker
    tls = None
    if b.tls is not None:
        tls = TlsSettings(ca_file=b.tls.ca_file, cert_file=b.tls.cert_file, key_file=b.tls.key_file, insecure=b.tls.insecure)
    return MqttSettings(
        host=b.host,
        port=b.port,
        client_id=f"agent-{config.shop}-{config.node}",
        username=b.username,
        password=b.secret(),
        tls=tls,
        keepalive_s=b.keepalive_s,
        protocol=b.protocol,
    )


class Agent:
    """One node agent. ``start()`` it, ``stop()`` it; thread-safe ``send`` for everyone else."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        registry: CollectorRegistry | None = None,
        facts_provider: FactsProvider | None = None,
        desired_state_handler: DesiredStateHandler | None = None,
        extra_pipelines: Sequence[tuple[Pipeline, PipelineConfigBase]] = (),
    ) -> None:
        self.config = config
        self.shop: str = config.shop
        self.node: str = config.node
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = AgentMetrics(self.registry)
        self.release: str | None = None
        """Release this node runs; set by the rollout code, reported in heartbeats."""
        self.controller_online: bool | None = None
        """Whether the controller's retained presence says online (None before it arrived)."""
        self.clock = ClockOffsetEstimator()
        self.outbox = Outbox(
            config.outbox.path,
            max_messages=config.outbox.max_messages,
            max_bytes=config.outbox.max_bytes,
            synchronous=config.outbox.synchronous,
            on_evict=lambda prio, n: self.metrics.evicted.labels(prio.name.lower()).inc(n),
        )
        for prio in Priority:
            self.metrics.outbox_depth.labels(prio.name.lower()).set_function(functools.partial(self._depth, prio))
        self.metrics.outbox_bytes.set_function(self.outbox.size_bytes)
        self.metrics.last_ack_age.set_function(self._last_ack_age)
        self.metrics.clock_offset.set_function(lambda: self.clock.offset() or 0.0)
        base = facts_provider or SystemFacts(
            node_class=config.node_class,
            disk_path=Path(config.outbox.path).resolve().parent,
            agent_version=AGENT_VERSION,
            probe=not {"onnx_providers", "gpu"} <= set(config.facts_override),
        )
        self.facts: FactsProvider = OverriddenFacts(base, config.facts_override) if config.facts_override else base
        self.uplink = UplinkLoop(
            mqtt_settings(config),
            self.outbox,
            self.metrics,
            shop=self.shop,
            node=self.node,
            on_downlink=self._on_downlink,
            agent_version=AGENT_VERSION,
            reconnect_min_s=config.broker.reconnect_min_s,
            reconnect_max_s=config.broker.reconnect_max_s,
            inflight=config.outbox.inflight,
            ack=config.uplink.ack,
            ack_timeout_s=config.uplink.ack_timeout_s,
        )
        self.uplink.on_drained = self._last_report
        self.commands: dict[str, CommandHandler] = {
            "ping": self._ping,
            "restart_pipeline": lambda cmd: restart_pipeline(self.supervisor, cmd),
        }
        self.command_guard = CommandGuard.from_files(
            self.shop, self.node, config.commands.public_keys, config.commands.counter_path(config.outbox.path),
            max_ttl_s=config.commands.max_ttl_s,
        )
        self._desired_handler = desired_state_handler
        self._desired_observe: Callable[[DesiredState], bool] | None = None
        self._desired_lock = threading.Lock()
        self._desired_latest: DesiredState | None = None
        self._desired_last_handled: bytes | None = None
        self._desired_wake = threading.Event()
        self._command_queue: queue.Queue[Command] = queue.Queue(maxsize=100)
        self._downlink_logged: set[str] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.supervisor = Supervisor()
        self.sinks: dict[str, AgentSink] = {}
        pipelines = [(build_pipeline(pc), pc) for pc in config.pipelines] + list(extra_pipelines)
        for pipeline, policy in pipelines:
            sink = AgentSink(self, pipeline.name, policy)
            self.sinks[pipeline.name] = sink
            self.supervisor.add(
                PipelineRunner(
                    pipeline,
                    policy,
                    sink,
                    on_state=self._on_pipeline_state,
                    on_restart=lambda name: self.metrics.pipeline_restarts.labels(name).inc(),
                )
            )
        self.metrics.watch_pipelines(lambda: {name: r.pipeline for name, r in self.supervisor.runners.items()}, _safe_health)
        self.metrics_server: MetricsServer | None = None
        self.heartbeats_sent = 0

    # extension points ---------------------------------------------------------------------------

    def register_command(self, name: str, handler: CommandHandler) -> None:
        """Handle commands called ``name`` with ``handler`` (replacing any earlier one)."""
        self.commands[name] = handler

    def register_desired_state_handler(self, handler: DesiredStateHandler, observe: Callable[[DesiredState], bool] | None = None) -> None:
        """Call ``handler`` with every new desired state of this node's shop.

        ``observe``, when given, sees every desired state on arrival (MQTT thread) and returns
        False for one that must not replace the pending one: the apply path's replay check, so a
        replayed older revision arriving right after the retained newest cannot displace it
        before the worker runs (latest-wins would otherwise hand only the replay to the handler).
        """
        self._desired_observe = observe
        self._desired_handler = handler
        with self._desired_lock:
            if self._desired_latest is not None:
                self._desired_wake.set()

    def send(self, model: type[U], **fields: Any) -> int:
        """Store an uplink message of type ``model`` in the outbox (shop/node/epoch/seq/ts filled in); return its seq.

        A heartbeat also carries the outbox's unreported evicted runs (``Heartbeat.evicted``).
        Raises pydantic's ``ValidationError`` if the fields are invalid; nothing is stored then.
        """
        kind = model.model_fields["kind"].default
        topic, priority, retain = route(kind, self.shop, self.node)

        def build(epoch: str, seq: int, ranges: Sequence[EvictedRange] = ()) -> bytes:
            extra = {"evicted": tuple(EvictedRun(first=r.first, last=r.last, priority=r.priority.name.lower()) for r in ranges)} if ranges else {}
            return encode(model(shop=self.shop, node=self.node, epoch=epoch, seq=seq, **fields, **extra))

        report = MAX_EVICTED_RANGES if model is Heartbeat else 0
        seq = self.outbox.enqueue(kind, priority, topic, build, retain=retain, report_evictions=report)
        self.metrics.enqueued.labels(kind).inc()
        self.uplink.wake()
        return seq

    # lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the uplink, the metrics endpoint, the workers and the pipelines."""
        if self.config.metrics.port:
            self.metrics_server = MetricsServer(
                self.registry, self.config.metrics.port, self.config.metrics.bind_host, health=lambda: agent_liveness(self)
            )
            log.info("node %s/%s serves metrics on port %d", self.shop, self.node, self.metrics_server.port)
        self.uplink.start()
        self.supervisor.start()
        for target, name in ((self._tick, "ticker"), (self._command_worker, "commands"), (self._desired_worker, "desired")):
            t = threading.Thread(target=target, name=f"agent-{self.node}-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        """Stop gracefully: pipelines, final telemetry, drain the outbox, offline presence."""
        drain = self.config.shutdown_timeout_s if timeout is None else timeout
        self.supervisor.stop()
        self._stop.set()
        self._desired_wake.set()
        for t in self._threads:
            t.join(5)
        for sink in self.sinks.values():
            _flush_quietly(sink)
        self.uplink.stop(drain_timeout=drain)
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.outbox.close()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected to the broker; return False on timeout."""
        return self.uplink.connected.wait(timeout)

    # heartbeats and telemetry ------------------------------------------------------------------

    def _depth(self, priority: Priority) -> int:
        return self.outbox.depth_by_priority()[priority]

    def _last_ack_age(self) -> float:
        last = self.uplink.last_ack
        return -1.0 if last is None else time.monotonic() - last

    def gate_metrics(self) -> dict[str, float]:
        """Return the gate metrics the pipelines reported, the worst value per name across pipelines."""
        out: dict[str, float] = {}
        for sink in self.sinks.values():
            for name, (value, worse) in sink.gate_metrics().items():
                old = out.get(name)
                if old is None or (value > old if worse == "higher" else value < old):
                    out[name] = value
        return out

    def _on_pipeline_state(self, name: str, state: str) -> None:
        self.metrics.pipeline_state.labels(name).state(state)
        if state != "running" and name in self.sinks:
            self.sinks[name].clear_gate_metrics()

    def heartbeat(self) -> int:
        """Collect facts and health and enqueue a heartbeat now; return its seq."""
        facts = self.facts.collect()
        offset = self.clock.offset()
        if offset is not None:
            facts = facts.model_copy(update={"clock_offset_s": offset})
        seq = self.send(
            Heartbeat,
            interval_s=self.config.heartbeat_interval_s,
            facts=facts,
            pipelines=self.supervisor.health(),
            # Refused publishes (MQTT 5 only), so the controller learns of them: additive keys, only once any.
            metrics={**self.gate_metrics(), **self.uplink.refusal_report()},
            outbox_depth=self.outbox.depth(),
            release=self.release,
        )
        self.metrics.heartbeats.inc()
        self.heartbeats_sent += 1
        return seq

    def _last_report(self) -> bool:
        """On a graceful stop, once the outbox drained: enqueue a final heartbeat if eviction reports are pending.

        Evicted runs travel only inside heartbeats; without this, an agent stopped right after an outage
        (its last heartbeat evicted, or none since the evictions) would keep them until its next start and
        the controller would count those seqs as missing meanwhile. Returns whether it enqueued one.
        """
        pending = self.outbox.unreported_evictions()
        if not pending:
            return False
        log.info("node %s/%s: sending a final heartbeat with %d pending eviction reports before stopping", self.shop, self.node, pending)
        self.heartbeat()
        return True

    def _tick(self) -> None:
        interval = self.config.heartbeat_interval_s
        next_beat = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                try:
                    self.heartbeat()
                except Exception:
                    log.exception("node %s/%s: heartbeat failed; trying again next interval", self.shop, self.node)
                next_beat = max(next_beat + interval, now)
            for sink in self.sinks.values():
                if now >= sink.next_flush:
                    _flush_quietly(sink)
            wake = min([next_beat] + [s.next_flush for s in self.sinks.values()])
            self._stop.wait(max(wake - time.monotonic(), 0.0))

    # downlink ----------------------------------------------------------------------------------

    def _on_downlink(self, msg: InMessage) -> None:
        """Parse and dispatch one downlink message; never raises (runs in the network loop)."""
        try:
            parsed = parse_downlink(msg.topic, msg.payload)
        except ProtocolError as exc:
            self._reject_downlink(exc.reason, f"{msg.topic}: {exc.detail}")
            return
        except Exception as exc:
            self._reject_downlink("internal", f"{msg.topic}: {exc!r}")
            return
        kind = parsed.kind
        self.metrics.downlink_received.labels(kind).inc()
        if isinstance(parsed, StoredAck):
            if (parsed.shop, parsed.node) != (self.shop, self.node):
                self._reject_downlink("identity_mismatch", f"{msg.topic}: a stored-ack for {parsed.shop}/{parsed.node}")
                return
            self.uplink.stored_ack(parsed.epoch, parsed.seq, parsed.missing)
        elif isinstance(parsed, ClockBeacon):
            self.clock.add(parsed.ts, time.time())
        elif isinstance(parsed, ControllerPresence):
            self.controller_online = parsed.state == "online"
            self.metrics.controller_online.set(1 if self.controller_online else 0)
        elif isinstance(parsed, Command):
            now = time.time() + (self.clock.offset() or 0.0)  # expiry is in controller time
            if parsed.expired(now):
                self.metrics.commands.labels(self._command_label(parsed.name), "expired").inc()
                log.info("node %s/%s ignored expired command %s (%s)", self.shop, self.node, parsed.name, parsed.correlation_id)
                return
            try:
                self._command_queue.put_nowait(parsed)
            except queue.Full:
                self._reject_downlink("queue_full", f"command {parsed.name} ({parsed.correlation_id}): 100 commands already waiting")
        elif isinstance(parsed, DesiredState):
            observe = self._desired_observe
            if observe is not None and not observe(parsed):
                return  # a replay: the apply path counted and reported it
            with self._desired_lock:
                self._desired_latest = parsed
            self._desired_wake.set()

    def _reject_downlink(self, reason: str, detail: str) -> None:
        self.metrics.downlink_rejected.labels(reason).inc()
        if reason not in self._downlink_logged:
            self._downlink_logged.add(reason)
            log.warning("node %s/%s dropped a downlink message (%s): %s; further ones are only counted", self.shop, self.node, reason, detail)

    def _command_label(self, name: str) -> str:
        return name if name in self.commands else "_unknown"

    def _ping(self, command: Command) -> dict[str, Any]:
        return {"pong": True, "ts": time.time(), "session": self.uplink.session, "outbox_depth": self.outbox.depth()}

    def _command_worker(self) -> None:
        while not self._stop.is_set():
            try:
                cmd = self._command_queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._run_command(cmd)
            except Exception:
                log.exception("node %s/%s: could not answer command %s (%s)", self.shop, self.node, cmd.name, cmd.correlation_id)

    def _run_command(self, cmd: Command) -> None:
        handler = self.commands.get(cmd.name)
        ok, result, error = False, {}, ""
        try:
            self.command_guard.check(cmd, time.time() + (self.clock.offset() or 0.0))
        except CommandRefused as exc:
            # Answered, so the operator sees why; the handler never runs.
            self.metrics.commands.labels(self._command_label(cmd.name), f"refused_{exc.reason}").inc()
            log.warning("node %s/%s refused command %s (%s): %s", self.shop, self.node, cmd.name, cmd.correlation_id, exc)
            self.send(CommandResult, correlation_id=cmd.correlation_id, ok=False, error=str(exc)[:ERROR_MAX_CHARS])
            return
        if handler is None:
            error = f"unknown command {cmd.name!r}; this agent knows: {', '.join(sorted(self.commands))}"
            outcome = "unknown"
        else:
            try:
                result = dict(handler(cmd) or {})
                ok, outcome = True, "ok"
            except Exception as exc:
                error, outcome = f"{type(exc).__name__}: {exc}"[:ERROR_MAX_CHARS], "error"
                log.warning("node %s/%s: command %s failed: %s", self.shop, self.node, cmd.name, error)
        self.metrics.commands.labels(self._command_label(cmd.name), outcome).inc()
        try:
            self.send(CommandResult, correlation_id=cmd.correlation_id, ok=ok, result=result, error=error)
        except (ValidationError, ValueError) as exc:
            self.send(CommandResult, correlation_id=cmd.correlation_id, ok=False, error=f"result not sendable: {exc}"[:ERROR_MAX_CHARS])

    def _desired_worker(self) -> None:
        while not self._stop.is_set():
            self._desired_wake.wait()
            self._desired_wake.clear()
            if self._stop.is_set():
                return
            with self._desired_lock:
                desired = self._desired_latest
            handler = self._desired_handler
            if desired is None or handler is None:
                continue
            fingerprint = desired.signing_bytes()
            if fingerprint == self._desired_last_handled:
                continue  # the retained copy again, after a reconnect
            try:
                handler(desired)
                self._desired_last_handled = fingerprint
                self.metrics.desired_states.labels("handled").inc()
            except Exception:
                self.metrics.desired_states.labels("error").inc()
                log.exception("node %s/%s: desired state handler failed for revision %d", self.shop, self.node, desired.revision)


def _safe_health(pipeline: Pipeline) -> dict[str, Any]:
    try:
        return pipeline.health() or {}
    except Exception:
        return {}


def _flush_quietly(sink: AgentSink) -> None:
    try:
        sink.flush()
    except Exception:
        log.exception("pipeline %s: could not send telemetry", sink.pipeline)


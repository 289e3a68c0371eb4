"""Supervision of local pipelines: the interface they implement and the workers that run them.

A pipeline is anything on the node that produces shop events and readings: a camera's vision
pipeline, a serial sensor board, an external process. The agent does not know what they do; it
runs each in a thread, hands it an :class:`EventSink`, restarts it with backoff when it fails
and reports its health in every heartbeat (KubeEdge modules and Frigate's watchdog work so).

The contract, kept deliberately small because vision and hardware adapters implement it:

* :class:`Pipeline` has a ``name``, a ``kind`` and ``run(stop, sink)`` that blocks until
  ``stop`` is set. Returning while ``stop`` is not set, or raising, is a failure.
  ``health()`` returns a dict with any of the keys of :data:`HEALTH_KEYS`, cheap to call from
  another thread at any time.
* :class:`EventSink` takes events, alerts, readings and gate metrics; it never raises into the
  pipeline for a bad value (the agent counts and drops it), so a pipeline's loop never dies of
  its own output.
* A pipeline type is a module listed in ``edge_agent/pipelines/__init__.py`` with a ``Config``
  model (a subclass of :class:`PipelineConfigBase` with ``type: Literal[...]``) and
  ``build(config) -> Pipeline``.

The restart policy is a pure function of the failure history (:func:`next_restart`), so the
budget rule ("at most N restarts per window, then give up") is tested without threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol import (
    DETAIL_MAX_CHARS,
    ID_PATTERN,
    INT64_MAX,
    PipelineHealth,
    PipelineState,
    Reading,
)

log = logging.getLogger(__name__)

HEALTH_KEYS = ("fps", "latency_ms", "dropped_frames", "last_frame_age_s", "errors", "detail", "errors_by_reason")
"""Keys a pipeline's ``health()`` may return. ``errors_by_reason`` (dict reason -> count, never
decreasing) is exported as ``shopfleet_agent_pipeline_errors_total{pipeline,reason}``."""

PIPELINE_STATES: tuple[str, ...] = get_args(PipelineState)
"""Every supervisor state, in the order of :data:`edge_agent.protocol.PipelineState` (its one spelling)."""

Worse = Literal["higher", "lower"]
"""Which direction of a gate metric is worse; decides how a node's pipelines are combined."""

GATE_METRIC_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
"""Names of gate metrics: lower-case snake case, as rollout policies spell them."""


@runtime_checkable
class EventSink(Protocol):
    """Where a pipeline puts what it saw. Thread-safe; never raises for a bad value."""

    def event(self, type: str, source: str, data: dict[str, Any], at: float | None = None) -> None:
        """Send a shop event (``'shelf_change'``, ``'door_opened'``...) through the outbox."""

    def alert(
        self,
        name: str,
        state: str,
        severity: str,
        source: str,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        """Raise (``state='firing'``) or clear (``'resolved'``) an alert of this node."""

    def readings(self, readings: list[Reading]) -> None:
        """Hand over sampled values; the agent downsamples and batches them into telemetry."""

    def gate_metric(self, name: str, value: float, worse: Worse = "higher") -> None:
        """Report the current value of a figure rollout gates judge (``vision_fps``, ``cart_review_rate``).

        The newest value per name is sent in every heartbeat's ``metrics`` until the pipeline
        reports it again or leaves the ``running`` state. Where several pipelines of a node report
        the same name, the heartbeat carries the worst value: the highest if ``worse`` is
        ``"higher"`` (error rates), the lowest if ``"lower"`` (frame rates). ``name`` matches
        :data:`GATE_METRIC_PATTERN` and ``value`` is finite, or the value is counted and dropped.
        """


@runtime_checkable
class Pipeline(Protocol):
    """A supervised local pipeline."""

    name: str
    kind: str

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Work until ``stop`` is set; raise (or return early) to report a failure."""

    def health(self) -> dict[str, Any]:
        """Return current health figures (keys of HEALTH_KEYS); cheap and thread-safe."""


class OwnMetrics:
    """A pipeline that keeps metrics of its own in ``self._registry`` (a ``CollectorRegistry``, made when it first runs).

    It is then a Prometheus collector of them: the agent re-exports them on /metrics with a
    ``pipeline`` label (:class:`edge_agent.metrics.PipelineCollectors`), and
    ``registry.register(pipeline)`` works too.
    """

    _registry: Any = None

    def collect(self) -> Iterator[Any]:
        """Yield the pipeline's own metric families (none before it ran)."""
        registry = self._registry
        if registry is not None:
            yield from registry.collect()

    def describe(self) -> list[Any]:
        """Return nothing, so registering does not collect early."""
        return []


class PipelineConfigBase(BaseModel):
    """Keys every pipeline entry of the agent config has; a pipeline type adds its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=ID_PATTERN, description="Unique name of the pipeline on this node, e.g. 'cam-1', 'shelf-board'.")
    restart_backoff_s: float = Field(
        1.0, gt=0, le=300, description="First delay before restarting a failed pipeline; doubles per consecutive failure."
    )
    restart_backoff_max_s: float = Field(
        60.0, gt=0, le=3600, description="Longest delay between restarts. Lower recovers faster; higher spares a broken device."
    )
    restart_budget: int = Field(
        5, ge=0, le=1000, description="Restarts allowed within restart_window_s before the pipeline is marked 'failed' and left stopped."
    )
    restart_window_s: float = Field(300.0, gt=0, description="Window over which restart_budget is counted.")
    telemetry_interval_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Readings are reduced per (name, source, labels) over this window and sent as one telemetry "
        "message. Longer saves bandwidth and outbox space; shorter shows changes sooner.",
    )
    telemetry_reduce: Literal["last", "mean", "min", "max"] = Field(
        "mean", description="How readings of one series within a window become one value."
    )


@dataclass(frozen=True)
class RestartDecision:
    """What to do after a failure: wait ``delay_s`` and restart, or give up (``give_up``)."""

    give_up: bool
    delay_s: float


def next_restart(policy: PipelineConfigBase, failures: list[float], consecutive: int, now: float) -> RestartDecision:
    """Decide whether and when to restart, given failure times and the current failure streak."""
    recent = [t for t in failures if now - t <= policy.restart_window_s]
    if len(recent) > policy.restart_budget:
        return RestartDecision(give_up=True, delay_s=0.0)
    delay = min(policy.restart_backoff_s * (2 ** max(consecutive - 1, 0)), policy.restart_backoff_max_s)
    return RestartDecision(give_up=False, delay_s=delay)


def health_to_model(kind: str, state: PipelineState, restarts: int, raw: dict[str, Any]) -> PipelineHealth:
    """Turn a pipeline's raw health dict plus supervisor state into a PipelineHealth."""
    fields: dict[str, Any] = {}
    # A pipeline's own numbers are taken only when the wire protocol can carry them (finite, in
    # range); anything else is left out rather than failing the whole heartbeat.
    for key in ("fps", "latency_ms", "last_frame_age_s"):
        v = raw.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
            fields[key] = float(v)
    for key in ("dropped_frames", "errors"):
        v = raw.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= INT64_MAX:
            fields[key] = v
    detail = raw.get("detail")
    if detail:
        fields["detail"] = str(detail)[:DETAIL_MAX_CHARS]
    return PipelineHealth(kind=str(kind)[:32], state=state, restarts=restarts, **fields)


class PipelineRunner:
    """Run one pipeline in a thread, restarting it per its policy until told to stop."""

    def __init__(
        self,
        pipeline: Pipeline,
        policy: PipelineConfigBase,
        sink: EventSink,
        *,
        on_state: Callable[[str, str], None] = lambda name, state: None,
        on_restart: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pipeline = pipeline
        self.policy = policy
        self.sink = sink
        self._on_state = on_state
        self._on_restart = on_restart
        self._clock = clock
        self._stop = threading.Event()
        self._state: PipelineState = "stopped"
        self.restarts = 0
        self.last_error = ""
        self._failures: deque[float] = deque(maxlen=max(policy.restart_budget + 1, 1))
        self._thread: threading.Thread | None = None
        # start() and stop() may race (a restart command's thread against the agent's shutdown):
        # the lock keeps the thread handle consistent, and once shut down a runner starts no more.
        self._lock = threading.Lock()
        self._shut_down = False

    @property
    def state(self) -> PipelineState:
        """Return the supervisor's view: starting, running, backoff, failed or stopped."""
        return self._state

    def _set_state(self, state: PipelineState) -> None:
        self._state = state
        self._on_state(self.pipeline.name, state)

    def start(self) -> None:
        """Start the supervising thread; refused once the runner was shut down."""
        with self._lock:
            if self._shut_down:
                raise RuntimeError(f"pipeline {self.pipeline.name} is shut down with its agent; not started")
            self._stop.clear()
            self._set_state("starting")
            thread = threading.Thread(target=self._loop, name=f"pipeline-{self.pipeline.name}", daemon=True)
            thread.start()
            self._thread = thread

    def request_stop(self, *, shut_down: bool = False) -> None:
        """Ask the pipeline to stop without waiting; ``shut_down`` also refuses later starts."""
        with self._lock:
            self._shut_down = self._shut_down or shut_down
            self._stop.set()

    def stop(self, timeout: float = 10.0, *, shut_down: bool = False) -> None:
        """Ask the pipeline to stop and wait up to ``timeout`` seconds for it."""
        with self._lock:
            self._shut_down = self._shut_down or shut_down
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("pipeline %s did not stop within %.1fs", self.pipeline.name, timeout)

    def _loop(self) -> None:
        consecutive = 0
        while not self._stop.is_set():
            started = self._clock()
            self._set_state("running")
            try:
                self.pipeline.run(self._stop, self.sink)
                if self._stop.is_set():
                    break
                raise RuntimeError("run() returned before stop was set")
            except Exception as exc:
                if self._stop.is_set():
                    break
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("pipeline %s failed: %s", self.pipeline.name, self.last_error)
            now = self._clock()
            # A run that lasted longer than the longest backoff resets the streak.
            consecutive = 1 if now - started > self.policy.restart_backoff_max_s else consecutive + 1
            self._failures.append(now)
            decision = next_restart(self.policy, list(self._failures), consecutive, now)
            if decision.give_up:
                log.error(
                    "pipeline %s failed %d times within %.0fs; giving up (state 'failed'). Fix the cause "
                    "and restart the agent. Last error: %s",
                    self.pipeline.name,
                    len(self._failures),
                    self.policy.restart_window_s,
                    self.last_error,
                )
                self._set_state("failed")
                return
            self._set_state("backoff")
            if self._stop.wait(decision.delay_s):
                break
            self.restarts += 1
            self._on_restart(self.pipeline.name)
        self._set_state("stopped")

    def health(self) -> PipelineHealth:
        """Return the pipeline's health as sent in heartbeats."""
        try:
            raw = self.pipeline.health() or {}
        except Exception as exc:
            raw = {"detail": f"health() failed: {exc}"}
        if self._state in ("backoff", "failed") and not raw.get("detail"):
            raw = {**raw, "detail": self.last_error}
        return health_to_model(self.pipeline.kind, self._state, self.restarts, raw)


class Supervisor:
    """Own the runners of all pipelines of a node."""

    def __init__(self) -> None:
        self.runners: dict[str, PipelineRunner] = {}

    def add(self, runner: PipelineRunner) -> None:
        """Add a runner; names must be unique."""
        name = runner.pipeline.name
        if name in self.runners:
            raise ValueError(f"two pipelines are named {name!r}: give each pipeline a unique name")
        self.runners[name] = runner

    def start(self) -> None:
        """Start every pipeline."""
        for r in self.runners.values():
            r.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every pipeline, giving each up to ``timeout`` seconds in total."""
        for r in self.runners.values():
            r.request_stop(shut_down=True)
        deadline = time.monotonic() + timeout
        for r in self.runners.values():
            r.stop(max(deadline - time.monotonic(), 0.1), shut_down=True)

    def health(self) -> dict[str, PipelineHealth]:
        """Return the health of every pipeline, by name."""
        return {name: r.health() for name, r in self.runners.items()}

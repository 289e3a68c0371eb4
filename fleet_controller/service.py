"""The controller process: intake, presence sweeper, retention, clock beacon, presence and API in one asyncio loop.

:class:`ControllerService` owns every long-running part and is what ``shopfleet controller``
runs and what tests start in-process (``await service.start()`` / ``await service.stop()``; the
API port comes from the settings, 0 picks a free one, :attr:`ControllerService.api_url` says which).

Extension points (other parts of the controller plug in here, before ``start()``):

1. ``service.add_worker(name, coro_fn)``: a background task, supervised with a restart budget
   (the rollout executor and the alert evaluator run this way). ``coro_fn()`` is called with no
   arguments (use ``functools.partial`` to bind the service) and must run until cancelled.
2. ``service.bus``: an in-process :class:`~fleet_controller.registry.bus.EventBus` of registry changes
   (:class:`fleet_controller.registry.bus.BusEvent`: ``presence``, ``event``, ``alert``,
   ``node_added``, ``node_removed``, ``shop_added``, ``reported_state``, plus whatever workers publish, e.g.
   ``alert_changed``). ``async with service.bus.subscribe({"presence"}) as sub: async for ev in
   sub: ...`` is what the dashboard's server-sent events do.
3. ``service.mqtt.publish(topic, payload, retain=..., qos=...)``: awaitable publish that returns
   once the broker acknowledged it (the rollout executor publishes signed desired state with it).
4. ``service.add_router(router)`` and ``service.add_dependency(Depends(...))``: included in the
   app :func:`fleet_controller.web.app.create_app` builds; a dependency guards every route
   (authentication). ``service.app_state`` entries become ``app.state`` attributes.

All registry writes go through one writer (``service.writer``, a child process by default, see
:class:`fleet_controller.intake.core.RegistryWriter`), so the intake's batches, the sweeper and
retention never race, and so does shop registration (``service.writer.register_shop``);
``service.reader`` (:class:`fleet_controller.registry.read.RegistryReader`) serves typed reads in
this process (API, dashboard, alerts, rollouts). Plug-ins see the service as a
:class:`fleet_controller.host.ControllerHost`.
Workers that write their own tables use their own sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI
from fastapi.params import Depends
from prometheus_client import CollectorRegistry

from edge_agent.protocol import ClockBeacon, ControllerPresence, Topics, encode
from fleet_controller.intake.core import Intake, RegistryWriter
from fleet_controller.intake.mqtt import InboundMessage, MqttAdapter, MqttConfig, Will
from fleet_controller.intake.partitions import PartitionRouter
from fleet_controller.metrics import ControllerMetrics
from fleet_controller.registry import migrations
from fleet_controller.registry.bus import BusEvent, EventBus
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.read import RegistryReader
from fleet_controller.settings import ControllerSettings
from fleet_controller.web.app import create_app

log = logging.getLogger(__name__)

WORKER_RESTART_BUDGET = 5
"""Crashes a worker may have within WORKER_RESTART_WINDOW_S before it is given up (health turns
degraded). Higher keeps a flaky worker alive longer; lower surfaces a broken one sooner."""
WORKER_RESTART_WINDOW_S = 300.0

STOP_PUBLISH_S = 5.0
"""Graceful stop: longest wait for the broker to acknowledge the retained offline presence."""
STOP_MQTT_S = 10.0
"""Graceful stop: longest wait for the MQTT disconnect and the network thread's end."""
STOP_TASKS_S = 10.0
"""Graceful stop: longest wait for the cancelled background tasks (intake, sweeper, workers) to end."""
STOP_API_S = 5.0
"""Graceful stop: longest wait for open API requests to finish (longer ones, such as a dashboard stream, are cut)."""
STOP_WRITER_S = 20.0
"""Graceful stop: longest wait for the registry writer to finish its queue and close; past it the writer is killed."""
STOP_EXIT_GRACE_S = 10.0
"""After a stop, longest wait for the process itself to end (threads, the writer); past it ``run_controller`` exits hard."""


def handover_budget_s(settings: ControllerSettings) -> float:
    """The longest a partitioned replica's hand-over takes on stop (``PartitionRouter.stop``): the hand-over (2 TTL +
    2 s), then the drain (as long again, at least 10 s)."""
    handover = 2 * settings.intake.lease_ttl_s + 2
    return handover + max(10.0, handover) + 5


def stop_budget_s(settings: ControllerSettings) -> float:
    """The longest a graceful stop of a controller with ``settings`` takes (the sum of its steps' deadlines); the
    process ends at most :data:`STOP_EXIT_GRACE_S` later. A pod's ``terminationGracePeriodSeconds`` must exceed both
    (manifests/central/base/controller.yaml), or the kubelet kills it in the middle of a stop."""
    total = STOP_PUBLISH_S + 1 + STOP_MQTT_S + STOP_TASKS_S + STOP_API_S + 1 + STOP_WRITER_S + 5
    return total + (handover_budget_s(settings) if settings.intake.partitions else 0.0)


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    name: str
    coro_fn: Callable[[], Awaitable[None]]
    task: asyncio.Task[None] | None = None
    state: str = "pending"  # pending, running, backoff, failed, stopped
    crashes: list[float] = field(default_factory=list)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def mqtt_config(settings: ControllerSettings) -> MqttConfig:
    """Return the adapter config for the controller's settings (subscriptions, Will, session)."""
    b = settings.broker
    will = ControllerPresence(state="offline", instance=settings.instance)
    return MqttConfig(
        host=b.host, port=b.port, client_id=b.client_id, subscriptions=tuple(Topics.controller_subscriptions),
        username=b.username, password=b.password, keepalive_s=b.keepalive_s, protocol=b.protocol,
        shared_group=b.shared_group, tls=b.tls, tls_ca_file=str(b.tls_ca_file) if b.tls_ca_file else None,
        tls_cert_file=str(b.tls_cert_file) if b.tls_cert_file else None, tls_key_file=str(b.tls_key_file) if b.tls_key_file else None,
        will=Will(Topics.controller_presence, encode(will), qos=1, retain=True),
    )


class ControllerService:
    """The whole controller in one asyncio process; see the module docstring for its extension points."""

    def __init__(
        self,
        settings: ControllerSettings,
        *,
        metrics_registry: CollectorRegistry | None = None,
        migrate: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = ControllerMetrics(self.metrics_registry)
        self.bus = EventBus(on_drop=self.metrics.bus_dropped.inc)
        if settings.db_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(settings.database_url())
        self.reader = RegistryReader(self.engine)
        self.writer = RegistryWriter(settings.database_url(), mode=settings.intake.writer, log_every_s=settings.intake.log_every_s)
        self.intake = Intake(self.writer, self.metrics, settings.intake, ack=self._ack, on_events=self._publish_events,
                             publish=lambda topic, payload: self.mqtt.publish_nowait(topic, payload, qos=1))
        self.mqtt = MqttAdapter(
            mqtt_config(settings), self.intake.submit, on_connect=[self._announce], on_state=self._mqtt_state,
            static_subscriptions=not settings.intake.partitions,
        )
        self.partitions = PartitionRouter(
            self.engine, self.mqtt, replica=settings.instance, partitions=settings.intake.partitions,
            ttl_s=settings.intake.lease_ttl_s, group=settings.broker.shared_group or "", registry=self.metrics_registry,
        ) if settings.intake.partitions else None
        self.app_state: dict[str, Any] = {"service": self, "bus": self.bus}
        self._migrate = migrate
        self._routers: list[APIRouter] = []
        self._dependencies: list[Depends] = []
        self._workers: dict[str, _Worker] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: uvicorn.Server | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._connections = 0
        self._started = False
        self.app: FastAPI | None = None

    # ----- extension points ----------------------------------------------------------------------

    def add_worker(self, name: str, coro_fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``coro_fn()`` as a supervised background task named ``name`` (restarted with backoff if it crashes)."""
        if name in self._workers:
            raise ValueError(f"a worker named {name!r} is already registered; pick another name")
        w = _Worker(name, coro_fn)
        self._workers[name] = w
        if self._started:
            self._tasks.append(asyncio.create_task(self._supervise(w), name=f"worker:{name}"))

    def add_router(self, router: APIRouter) -> None:
        """Include ``router`` in the API (call before ``start``)."""
        self._check_not_started("add_router")
        self._routers.append(router)

    def add_dependency(self, dependency: Depends) -> None:
        """Guard every API route with ``dependency`` (a ``Depends(...)``; call before ``start``)."""
        self._check_not_started("add_dependency")
        self._dependencies.append(dependency)

    def _check_not_started(self, what: str) -> None:
        if self._started:
            raise RuntimeError(f"{what} must be called before ControllerService.start()")

    # ----- lifecycle -------------------------------------------------------------------------

    @property
    def api_port(self) -> int:
        """Return the port the API listens on (the real one when the settings said 0)."""
        if self._sock is None:
            raise RuntimeError("the API is not listening yet: await start() first")
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def api_url(self) -> str:
        """Return ``http(s)://host:port`` of the API (https when api.tls_cert_file is set)."""
        scheme = "https" if self.settings.api.tls_cert_file is not None else "http"
        return f"{scheme}://{self.settings.api.host}:{self.api_port}"

    async def start(self, *, connect_timeout: float | None = None) -> None:
        """Migrate the database, start the API, connect to the broker, start every task; raise ``ConnectRefused``/``ConnectFailed`` if the broker refuses or stays unreachable."""
        if self._migrate:
            await asyncio.to_thread(migrations.upgrade, self.engine)
        else:
            behind = await asyncio.to_thread(migrations.pending, self.engine)
            if behind:
                raise RuntimeError(
                    f"database {self.engine.url.render_as_string()} lacks revisions {sorted(behind)}: "
                    "run without --no-migrate to upgrade it"
                )
        # Start the writer (a child process takes a second or two to import) before messages arrive.
        writer_pid = await self.writer.call("ping")
        log.info("registry writer running (%s, pid %s)", self.writer.mode, writer_pid)
        self.metrics.watch_presence(self.reader.presence_counts)
        self.app = app = create_app(
            self.reader, self.metrics_registry, writer=self.writer, routers=self._routers, dependencies=self._dependencies,
            health=self.health, state=self.app_state,
        )
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.settings.api.host, self.settings.api.port))
        self._sock.listen(128)
        self._sock.setblocking(False)
        self._server = _QuietServer(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                                   **self.settings.api.uvicorn_options()))
        self._server_task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="api")
        self._started = True
        self._tasks += [
            asyncio.create_task(self.intake.run(), name="intake"),
            asyncio.create_task(self._every(self.settings.presence.sweep_interval_s, self._sweep), name="presence-sweeper"),
            asyncio.create_task(self._every(self.settings.retention.interval_s, self._retention), name="retention"),
            asyncio.create_task(self._every(self.settings.clock_interval_s, self._beacon), name="clock-beacon"),
        ]
        for w in self._workers.values():
            self._tasks.append(asyncio.create_task(self._supervise(w), name=f"worker:{w.name}"))
        if self.partitions is not None:
            await asyncio.to_thread(self.partitions.start)
        self.mqtt.start()
        await asyncio.to_thread(self.mqtt.wait_connected, connect_timeout or self.settings.broker.connect_timeout_s)
        if self.partitions is not None:
            self._tasks.append(asyncio.create_task(self.partitions.run(), name="partitions"))
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            if self._server_task.done():
                self._server_task.result()
            await asyncio.sleep(0.02)
        log.info("controller %s: API on %s, broker %s:%s, database %s", self.settings.instance, self.api_url,
                 self.settings.broker.host, self.settings.broker.port, self.engine.url.render_as_string())

    async def stop(self) -> list[str]:
        """Say goodbye on MQTT (retained offline presence), stop every task and the API, close the database.

        Bounded: every step has a deadline (the ``STOP_*`` constants, :func:`stop_budget_s` in all);
        a step past it is abandoned, logged as such, and the next one runs. Nothing is lost by that:
        a message is acknowledged only after its batch committed, so what an abandoned step held
        stays queued on the broker (and in the agents' outboxes) for the next start. Returns the
        abandoned steps (empty after a clean stop).
        """
        if not self._started:
            return []
        self._started = False
        abandoned: list[str] = []

        async def step(what: str, aw: Awaitable[Any], timeout: float, consequence: str) -> bool:
            # Not asyncio.wait_for: on its timeout it cancels the step and then waits for the step to
            # end, for ever if the step ignores its cancellation (a task that swallows CancelledError).
            t0 = time.monotonic()
            fut = asyncio.ensure_future(aw)
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            if not done:
                fut.cancel()  # and move on without waiting for it
                abandoned.append(what)
                log.error("stop: %s did not finish within %.0fs; abandoned (%s)", what, timeout, consequence)
                return False
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None:
                log.warning("stop: %s failed: %s", what, exc)
            log.debug("stop: %s took %.2fs", what, time.monotonic() - t0)
            return True

        if self.partitions is not None:
            await step("partition hand-over", self.partitions.stop(), handover_budget_s(self.settings),
                       "other replicas take the partitions over when the leases expire")
        if self.mqtt.connected:
            await step("offline presence", self.mqtt.publish(
                Topics.controller_presence, encode(ControllerPresence(state="offline", instance=self.settings.instance)),
                retain=True, timeout=STOP_PUBLISH_S,
            ), STOP_PUBLISH_S + 1, "the broker publishes the Will instead once the connection is gone")
        await step("MQTT disconnect", asyncio.to_thread(self.mqtt.stop), STOP_MQTT_S,
                   "the network thread is left behind; unacknowledged messages stay queued on the broker")
        for t in self._tasks:
            t.cancel()
        if not await step("background tasks", asyncio.gather(*self._tasks, return_exceptions=True), STOP_TASKS_S,
                          "a task did not end on cancellation"):
            log.error("stop: still running: %s", [t.get_name() for t in self._tasks if not t.done()])
        self._tasks.clear()
        if self._server is not None:
            self._server.should_exit = True
            if self._server_task is not None:
                server_task = self._server_task
                if not await step("API server", server_task, STOP_API_S, "open requests are cut off"):
                    self._server.force_exit = True
                    await asyncio.wait([server_task], timeout=1)
        if self._sock is not None:
            self._sock.close()
        closed: list[bool] = []

        async def close_writer() -> None:
            closed.append(await asyncio.to_thread(self.writer.close, STOP_WRITER_S))

        if not await step("registry writer", close_writer(), STOP_WRITER_S + 5,
                          "the writer is killed; its uncommitted batch rolls back and was never acknowledged"):
            self.writer.kill()
        elif closed == [False]:  # RegistryWriter.close killed it after STOP_WRITER_S (and logged why)
            abandoned.append("registry writer")
        self.engine.dispose()
        if abandoned:
            log.error("controller %s stopped with abandoned steps: %s (unacknowledged messages stay queued on the broker)",
                      self.settings.instance, ", ".join(abandoned))
        else:
            log.info("controller %s stopped", self.settings.instance)
        return abandoned

    def stop_budget_s(self) -> float:
        """Return the longest :meth:`stop` can take (the sum of its steps' deadlines)."""
        return stop_budget_s(self.settings)

    def health(self) -> dict[str, Any]:
        """Return the health report of /healthz: ``ok`` when connected, storing, and no worker has failed."""
        workers = {w.name: w.state for w in self._workers.values()}
        failing = self.intake.failing_since
        ok = self.mqtt.connected and "failed" not in workers.values() and failing is None
        return {
            "status": "ok" if ok else "degraded",
            "instance": self.settings.instance,
            "mqtt_connected": self.mqtt.connected,
            "workers": workers,
            "messages_stored": self.intake.stored_total,
            "store_failing_for_s": None if failing is None else round(time.time() - failing, 1),
        }

    # ----- internals ---------------------------------------------------------------------------

    def _ack(self, message: InboundMessage) -> None:
        self.mqtt.ack(message)

    def _publish_events(self, events: Iterable[BusEvent]) -> None:
        for e in events:
            if e.topic == "presence":
                self.metrics.presence_changes.labels(presence=e.data["new"]).inc()
            self.bus.publish(e)

    def _mqtt_state(self, connected: bool) -> None:
        self.metrics.mqtt_connected.set(1 if connected else 0)
        if connected:
            self._connections += 1
            if self._connections > 1:
                self.metrics.mqtt_reconnects.inc()

    def _announce(self, session_present: bool) -> None:
        """Publish the retained online presence after every (re)connection (network thread)."""
        msg = ControllerPresence(state="online", instance=self.settings.instance)
        self.mqtt.publish_nowait(Topics.controller_presence, encode(msg), retain=True, qos=1)

    async def _every(self, period: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:  # a periodic job must not die of one failure
                log.exception("periodic job %s failed; it runs again in %.1fs", getattr(job, "__name__", job), period)
            await asyncio.sleep(period)

    async def _sweep(self) -> None:
        # A partitioned replica judges only the shops it stores (PartitionRouter.swept_shops).
        shops = self.partitions.swept_shops() if self.partitions is not None else None
        events = await self.writer.call("sweep", self.settings.presence, None, shops)
        if any(e.topic == "presence_storm" for e in events):
            self.metrics.presence_sweeps_capped.inc()  # a mass outage: the rest is marked by the next sweeps
        self._publish_events(events)

    async def _retention(self) -> None:
        deleted = await self.writer.call("retention", self.settings.retention)
        for table, n in deleted.items():
            if n:
                self.metrics.retention_deleted.labels(table=table).inc(n)

    async def _beacon(self) -> None:
        if self.mqtt.connected:
            self.mqtt.publish_nowait(Topics.controller_clock, encode(ClockBeacon(instance=self.settings.instance)), qos=0)

    async def _supervise(self, w: _Worker) -> None:
        while True:
            w.state = "running"
            try:
                await w.coro_fn()
                w.state = "stopped"
                log.info("worker %s finished", w.name)
                return
            except asyncio.CancelledError:
                w.state = "stopped"
                raise
            except Exception:
                now = time.monotonic()
                w.crashes = [t for t in w.crashes if now - t < WORKER_RESTART_WINDOW_S] + [now]
                if len(w.crashes) > WORKER_RESTART_BUDGET:
                    w.state = "failed"
                    log.exception("worker %s crashed %s times in %.0fs; giving up", w.name, len(w.crashes), WORKER_RESTART_WINDOW_S)
                    return
                delay = min(2 ** (len(w.crashes) - 1), 60)
                w.state = "backoff"
                self.metrics.worker_restarts.labels(worker=w.name).inc()
                log.exception("worker %s crashed; restarting in %ss", w.name, delay)
                await asyncio.sleep(delay)


def build_service(
    settings: ControllerSettings, *, migrate: bool = True, announce: Callable[[str], None] | None = None
) -> ControllerService:
    """Return the whole controller: the core service plus logins and dashboard, alerts, releases and rollouts.

    This is the one composition root: the one place the parts are put together (``shopfleet controller`` and the demo both
    use it); each part plugs in through the extension points above. Raises ``ValueError``
    subclasses naming the file and the fix for a bad alert-rules file or signing key.
    """
    from fleet_controller import alerts, rollout
    from fleet_controller.alerts.rules import load_rules
    from fleet_controller.rollout.signing import load_private_key
    from fleet_controller.web import (
        alerts_pages,
        enrollment_api,
        models_api,
        reviews,
        security_events,
    )
    from fleet_controller.web.dashboard.setup import attach

    rules = load_rules(settings.alert_rules)
    if settings.rollout is not None:
        load_private_key(settings.rollout.signing_key)  # refuse a missing or bad key now, not at the first rollout
    service = ControllerService(settings, migrate=migrate)
    attach(service, rules, open_metrics=settings.dashboard.public_metrics, secure_cookies=settings.dashboard.secure_cookies,
           announce=announce)
    alert_worker = alerts.install(service, rules, dashboard_url=settings.dashboard.url)
    alerts_pages.attach(service, alert_worker.metrics, dashboard_url=settings.dashboard.url)
    security_events.install(service)
    rollout.install(service, settings.rollout)
    reviews.install(service)
    models_api.install(service, settings.rollout.signing_key if settings.rollout else None)
    enrollment_api.install(service)
    return service


def run_controller(settings: ControllerSettings, *, migrate: bool = True) -> int:
    """Run the controller until SIGINT or SIGTERM; return the exit code."""

    async def main() -> int:
        try:
            service = build_service(settings, migrate=migrate, announce=lambda line: print(line, flush=True))
        except ValueError as exc:
            print(f"shopfleet controller: {exc}", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await service.start()
        except Exception as exc:
            log.error("controller failed to start: %s", exc)
            await service.stop()
            return 1
        print(f"controller {settings.instance}: API {service.api_url} (docs at {service.api_url}/docs)", flush=True)
        await stop.wait()
        budget = service.stop_budget_s()
        log.info("stopping (at most %.0fs)", budget)
        # The last resort: whatever hangs after the bounded stop (a thread of an abandoned step that
        # the interpreter would join at exit, say), the process ends this long after SIGTERM.
        watchdog = threading.Timer(budget + STOP_EXIT_GRACE_S, _exit_now, args=(service, f"the process did not exit within "
                                   f"{budget + STOP_EXIT_GRACE_S:.0f}s of the stop request"))
        watchdog.daemon = True
        watchdog.start()
        abandoned = await service.stop()
        if abandoned:  # their threads would keep the interpreter from exiting: do not wait for them
            _exit_now(service, f"abandoned on stop: {', '.join(abandoned)}", dump=False)
        return 0

    return asyncio.run(main())


def _exit_now(service: ControllerService, why: str, *, dump: bool = True) -> None:
    """End the process now with exit code 1 (messages not acknowledged stay queued on the broker)."""
    log.error("controller %s exits now: %s; messages not acknowledged stay queued on the broker", service.settings.instance, why)
    if dump:
        with contextlib.suppress(Exception):  # stderr may be no real file
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    with contextlib.suppress(Exception):
        service.writer.kill()
    for h in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            h.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(1)

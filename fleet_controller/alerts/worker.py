"""The alert worker: read a snapshot of the registry, evaluate, store, notify; again and again.

The decision is the pure :func:`~fleet_controller.alerts.evaluator.evaluate`; this module is
the I/O around it. One evaluation runs in a thread (it is blocking SQL) and a failure of any
kind is logged, counted in ``shopfleet_alerts_evaluation_errors_total{reason}`` and retried at
the next tick, so the loop never dies. The "for N seconds" timers are read from the database on
the first evaluation and written back after each, so a restart does not reset them. Deliveries
(the rules file's webhook and the channels admins manage) run as their own tasks so a slow
receiver never delays evaluation; an alert that flaps (comes back within ``resolve_after_s``)
updates the page but notifies nobody, and a silenced one notifies nobody either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy.exc import SQLAlchemyError

from fleet_controller.alerts import channels, store, webhook
from fleet_controller.alerts.evaluator import (
    FleetSnapshot,
    NodeRaised,
    NodeSnapshot,
    ReadingSnapshot,
    ShopCarts,
    evaluate,
)
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.alerts.rules import AlertRules
from fleet_controller.alerts.store import Changes
from fleet_controller.registry.carts import CartStore, review_rates
from fleet_controller.registry.read import RegistryReader

log = logging.getLogger(__name__)


def load_snapshot(reader: RegistryReader, reading_names: tuple[str, ...], raised: dict[tuple[str, str, str, str], NodeRaised],
                  after_event_id: int, cart_window_s: float | None = None, now: float | None = None) -> tuple[FleetSnapshot, int]:
    """Read nodes and the readings the rules use; fold node-raised alerts newer than ``after_event_id`` into ``raised``.

    Node alerts are read incrementally (by event id, on the primary key), so the events table,
    which holds thousands of rows per shop, is scanned once per process and never again. This
    relies on event ids being committed in order, which the registry's single writer guarantees.
    Returns the snapshot and the highest event id seen.
    """
    nodes = tuple(NodeSnapshot(n.shop, n.node, n.presence, n.last_seen, n.facts, n.pipelines) for n in reader.node_states())
    readings = tuple(
        ReadingSnapshot(r.shop, r.node, r.source, r.name, r.value, r.ts, r.labels) for r in reader.readings(names=reading_names)
    )
    for e in reader.node_alerts_after(after_event_id):
        k = (e.shop, e.node, e.type, e.source)
        prev = raised.get(k)
        # A node repeating "firing" (after a reconnect) does not move the start: the first firing message does.
        since = prev.since if prev is not None and prev.state == "firing" and e.state == "firing" else e.at
        raised[k] = NodeRaised(e.shop, e.node, e.type, e.source, e.state, e.severity, e.message, since, e.data)
        after_event_id = e.id
    carts: tuple[ShopCarts, ...] = ()
    if cart_window_s is not None:
        carts = tuple(ShopCarts(*r) for r in review_rates(CartStore(reader.engine), time.time() if now is None else now, cart_window_s))
    return FleetSnapshot(nodes, readings, tuple(raised.values()), carts), after_event_id


class AlertWorker:
    """Evaluate the rules every ``rules.interval_s`` and keep the alert table, metrics and webhook in step."""

    def __init__(self, reader: RegistryReader, rules: AlertRules, metrics: AlertMetrics, *,
                 publish: Callable[[str, dict[str, Any]], Any] | None = None, clock: Callable[[], float] = time.time,
                 dashboard_url: str = "", webhook_base_delay_s: float = 0.5) -> None:
        self.reader = reader
        self.engine = reader.engine  # the alert tables
        self.rules = rules
        self.metrics = metrics
        self.publish = publish
        self.clock = clock
        self.dashboard_url = dashboard_url
        self.webhook_base_delay_s = webhook_base_delay_s
        self._pending: dict[str, float] | None = None  # loaded from the database on the first evaluation
        self._channels: list[channels.ChannelView] = []
        self._raised: dict[tuple[str, str, str, str], NodeRaised] = {}
        self._after_event_id = 0
        self._deliveries: set[asyncio.Task[Any]] = set()

    def evaluate_once(self) -> Changes:
        """Run one evaluation and store its result; return what opened and resolved."""
        started = time.perf_counter()
        now = self.clock()
        snapshot, self._after_event_id = load_snapshot(
            self.reader, (self.rules.fridge_warm.reading,), self._raised, self._after_event_id,
            self.rules.cart_review_rate_high.window_s if self.rules.cart_review_rate_high.enabled else None, now)
        if self._pending is None:
            self._pending = store.load_pending(self.engine)
        result = evaluate(snapshot, self.rules, now, store.active_keys(self.engine), self._pending)
        changes = store.sync(self.engine, result.firing, now, self.rules.resolve_after)
        store.save_pending(self.engine, result.pending, self._pending)
        self._pending = result.pending
        for a in changes.flapped:
            self.metrics.flaps.labels(a.rule).inc()
            log.info("alert %s came back within resolve_after_s (flap %d)", a.key, a.flaps)
        for a in changes.opened:
            self.metrics.opened.labels(a.rule).inc()
            log.info("alert %s opened: %s", a.key, a.summary)
        for a in changes.resolved:
            self.metrics.resolved.labels(a.rule).inc()
            log.info("alert %s resolved", a.key)
        self.metrics.set_firing(store.list_alerts(self.engine, now, state="firing", limit=100_000))
        if changes.opened or changes.resolved:
            self._channels = channels.list_channels(self.engine)
        self.metrics.evaluation_seconds.observe(time.perf_counter() - started)
        return changes

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def _notify(self, client: httpx.AsyncClient, changes: Changes) -> None:
        for a in changes.opened + changes.resolved + changes.flapped:
            if self.publish is not None:
                try:
                    self.publish("alert_changed", a.as_dict())
                except Exception:
                    log.exception("publishing alert %s on the bus failed", a.key)
        for a in changes.opened + changes.resolved:
            if a.silenced_until:
                continue
            wh = self.rules.webhook
            if wh.url and (a.state != "resolved" or wh.send_resolved):
                self._spawn(webhook.send(client, wh, a, self.metrics, self.dashboard_url, self.webhook_base_delay_s))
            for ch in self._channels:
                if ch.wants(a):
                    self._spawn(channels.deliver(client, self.engine, ch, a, self.metrics.notifications,
                                                 dashboard_url=self.dashboard_url, base_delay_s=self.webhook_base_delay_s,
                                                 clock=self.clock))

    async def tick(self, client: httpx.AsyncClient) -> Changes | None:
        """Evaluate once in a thread and notify; log and count any failure instead of raising."""
        try:
            changes = await asyncio.to_thread(self.evaluate_once)
        except SQLAlchemyError as exc:
            self.metrics.evaluation_errors.labels("database").inc()
            log.warning("alert evaluation failed, retrying next tick: database: %s", exc)
            return None
        except Exception:
            self.metrics.evaluation_errors.labels("other").inc()
            log.exception("alert evaluation failed, retrying next tick")
            return None
        self._notify(client, changes)
        return changes

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Evaluate until ``stop`` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        async with httpx.AsyncClient() as client:
            while not stop.is_set():
                await self.tick(client)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # arrives as the awaited event completes, and stop would wait for this loop for ever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.rules.interval_s):
                        await stop.wait()
            await self.flush(self.rules.webhook.timeout_s * (self.rules.webhook.retries + 1))

    async def flush(self, timeout: float | None = None) -> None:
        """Wait for the webhook deliveries in flight (at most ``timeout`` seconds)."""
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=timeout)


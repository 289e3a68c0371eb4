"""Live updates for the browser: an in-process hub of bounded subscriber queues, served as SSE.

The controller's event bus (registry changes) and the alert worker publish here; each open
dashboard tab is one subscriber. A tab that cannot keep up loses messages rather than slowing
the controller: its queue is bounded and a full queue drops (counted in
``shopfleet_dashboard_live_dropped_total``); the page then refreshes its table on the next
message anyway, so a drop costs freshness, never correctness.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
"""Messages buffered per tab; more absorbs bursts (a rollout wave) but holds more memory per tab."""
KEEPALIVE_S = 15.0
"""Seconds between SSE comments on an idle stream, so proxies do not close it."""


class LiveHub:
    """Fan out ``(topic, data)`` messages to every subscriber without ever blocking the publisher."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._subs: set[asyncio.Queue[tuple[str, dict[str, Any]]]] = set()
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.subscribers = Gauge("shopfleet_dashboard_live_subscribers", "Open live-update streams.", registry=registry)
        self.published = Counter("shopfleet_dashboard_live_published_total", "Messages published to live streams.", registry=registry)
        self.dropped = Counter(
            "shopfleet_dashboard_live_dropped_total", "Messages dropped because a stream's queue was full.", registry=registry
        )

    def listen(self, fn: Callable[[str, dict[str, Any]], None]) -> None:
        """Call ``fn(topic, data)`` for every message, before it is queued (e.g. to invalidate a cache)."""
        self._listeners.append(fn)

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Queue a message for every subscriber; callable from the loop or (thread-safe) from other threads."""
        for fn in self._listeners:
            fn(topic, data)
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fanout(topic, data)
        else:
            loop.call_soon_threadsafe(self._fanout, topic, data)

    def _fanout(self, topic: str, data: dict[str, Any]) -> None:
        self.published.inc()
        for q in list(self._subs):
            try:
                q.put_nowait((topic, data))
            except asyncio.QueueFull:
                self.dropped.inc()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Remember the loop subscribers live on (publishers on other threads hand over to it)."""
        self._loop = loop

    async def stream(self, keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[str]:
        """Yield SSE frames for one subscriber until cancelled."""
        self.bind(asyncio.get_running_loop())
        q: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(QUEUE_SIZE)
        self._subs.add(q)
        self.subscribers.inc()
        try:
            yield "retry: 3000\n\n"
            while True:
                try:
                    topic, data = await asyncio.wait_for(q.get(), keepalive_s)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                yield f"event: {topic}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"
        finally:
            self._subs.discard(q)
            self.subscribers.dec()

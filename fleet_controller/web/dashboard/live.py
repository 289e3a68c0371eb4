"""Live updates for the browser: an in-process hub of bounded subscriber queues, served as SSE.

The controller's event bus (registry changes) and the alert worker publish here; each open
dashboard tab is one subscriber. A tab that cannot keep up loses messages rather than slowing
the controller: its queue is bounded and a full queue drops (counted in
``shopfleet_dashboard_live_dropped_total``); the page then refreshes its table on the next
message anyway, so a drop costs freshness, never correctness.

Every stream also carries a ``ping`` event (the server's clock) at once and then whenever it
has been idle for :data:`PING_S`. The browser's watchdog counts any message as a sign of life and
shows "disconnected" when none came for 5 s: a stopped controller or a dead proxy is visible in
seconds, instead of an indicator that stays green while EventSource retries in silence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
"""Messages buffered per tab; more absorbs bursts (a rollout wave) but holds more memory per tab."""
PING_S = 2.0
"""Seconds of idleness after which a stream sends a ``ping`` event; the browser declares the
controller lost after 5 s without any message, so keep this well below that. Also keeps proxies
from closing an idle stream."""


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

    async def stream(self, ping_s: float = PING_S, clock: Callable[[], float] = time.time) -> AsyncIterator[str]:
        """Yield SSE frames for one subscriber until cancelled: a ping first, messages, a ping when idle for ``ping_s``."""
        self.bind(asyncio.get_running_loop())
        q: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(QUEUE_SIZE)
        self._subs.add(q)
        self.subscribers.inc()
        try:
            yield "retry: 3000\n\n"
            yield f"event: ping\ndata: {{\"at\":{clock():.3f}}}\n\n"
            while True:
                try:
                    async with asyncio.timeout(ping_s):  # not wait_for, which can swallow a cancellation on 3.11
                        topic, data = await q.get()
                except TimeoutError:
                    yield f"event: ping\ndata: {{\"at\":{clock():.3f}}}\n\n"
                    continue
                yield f"event: {topic}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"
        finally:
            self._subs.discard(q)
            self.subscribers.dec()

"""Registry changes as events, and the in-process bus that carries them to whoever listens.

The writer returns every change it makes as :class:`BusEvent` values; the service publishes them
on its :class:`EventBus`, and readers (the dashboard's live feed, the alert worker's
``alert_changed`` notices) subscribe instead of polling the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BusEvent:
    """A change in the registry, as published on the service's event bus.

    ``topic`` is one of ``presence`` (data: old, new, reason, session), ``event`` and ``alert``
    (data: the stored event row), ``node_added``, ``node_removed`` (an admin removed it: DELETE
    /api/v1/shops/{shop}/nodes/{node}), ``shop_added``, ``reported_state``,
    ``presence_storm`` (shop ``""``, node None; data: marked, sweep_max_changes: a sweep that marked
    its bound of nodes and left the rest of a mass outage to the next sweeps).
    """

    topic: str
    shop: str
    node: str | None
    data: dict[str, Any]
    at: float = field(default_factory=time.time)


class Subscription:
    """One subscriber's bounded queue of bus events; iterate it with ``async for``."""

    def __init__(self, bus: EventBus, topics: frozenset[str] | None, maxsize: int) -> None:
        self._bus = bus
        self.topics = topics
        self.queue: asyncio.Queue[BusEvent] = asyncio.Queue(maxsize)
        self.dropped = 0

    def wants(self, event: BusEvent) -> bool:
        """Return whether this subscriber asked for the event's topic."""
        return self.topics is None or event.topic in self.topics

    async def get(self) -> BusEvent:
        """Return the next event, waiting for one."""
        return await self.queue.get()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> BusEvent:
        return await self.queue.get()

    def close(self) -> None:
        """Stop receiving events."""
        self._bus._unsubscribe(self)


class EventBus:
    """In-process async pub/sub of registry changes; a slow subscriber loses events, never blocks the intake.

    ``on_drop`` is called once per event a full subscriber queue lost (the service counts them in
    ``shopfleet_controller_bus_dropped_total``).
    """

    def __init__(self, on_drop: Callable[[], None] | None = None) -> None:
        self._subs: set[Subscription] = set()
        self._on_drop = on_drop

    @property
    def subscribers(self) -> int:
        """Return how many subscriptions are open (tests wait on it before publishing)."""
        return len(self._subs)

    def publish(self, event: BusEvent) -> None:
        """Deliver ``event`` to every interested subscriber (call on the event loop's thread)."""
        for sub in list(self._subs):
            if not sub.wants(event):
                continue
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()

    def publish_many(self, events: Iterable[BusEvent]) -> None:
        """Publish each of ``events`` in order."""
        for e in events:
            self.publish(e)

    @contextlib.asynccontextmanager
    async def subscribe(self, topics: Iterable[str] | None = None, maxsize: int = 1000) -> AsyncIterator[Subscription]:
        """Subscribe to ``topics`` (all when None) for the duration of the ``async with`` block."""
        sub = Subscription(self, frozenset(topics) if topics is not None else None, maxsize)
        self._subs.add(sub)
        try:
            yield sub
        finally:
            sub.close()

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

"""A service with ``async start()`` and ``async stop()`` (the controller, mostly) on its own event loop thread.

The tests that drive a running controller from synchronous code (a browser, a subprocess, an
HTTP client) share this; what they add to the service before it starts stays theirs.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Service)
T = TypeVar("T")


class LoopThread(Generic[S]):
    """Start ``service`` on a new event loop in a daemon thread; ``call`` runs coroutines there, ``stop`` ends both."""

    def __init__(self, service: S, *, timeout: float = 60) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=f"loop-{type(service).__name__}")
        self.thread.start()
        try:
            self.call(service.start(), timeout)
        except BaseException:
            self._end_loop()
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run ``coro`` on the service's loop and return its result (its exception raised here)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 60) -> None:
        """Stop the service, then its loop and thread (again is a no-op)."""
        if self.loop.is_closed():
            return
        try:
            self.call(self.service.stop(), timeout)
        finally:
            self._end_loop()

    def _end_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

"""Run a real ``ControllerService`` on its own event loop in a thread, for blocking tests.

End-to-end tests drive subprocesses and brokers with blocking waits; the controller must keep
ingesting meanwhile, so it gets a loop of its own instead of sharing the test's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fleet_controller.service import ControllerService
from fleet_controller.settings import ControllerSettings


class ControllerThread:
    """A controller service running in a background thread; ``call`` runs code on its loop."""

    def __init__(self, settings: ControllerSettings, setup: Callable[[ControllerService], Any] | None = None) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="controller-loop", daemon=True)
        self.service = ControllerService(settings)
        if setup is not None:
            setup(self.service)

    def start(self, timeout: float = 60) -> "ControllerThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.service.start(), self.loop).result(timeout)
        return self

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run ``fn`` on the controller's loop and return its result."""
        fut: Future = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def stop(self, timeout: float = 60) -> None:
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)

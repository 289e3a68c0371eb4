"""Fixtures of the hardware tests: a driver running in a thread with everything it emitted."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry

from hardware.driver import Driver, DriverSettings
from hardware.planogram import Planogram, Slot

PLANOGRAM = Planogram(
    slots=(
        Slot(board="shelf-a", channel=0, slot="A1", product="cola-330", unit_weight_g=345, unit_weight_sd_g=3),
        Slot(board="shelf-a", channel=1, slot="A2", product="choc-50", unit_weight_g=50, unit_weight_sd_g=1),
    )
)


class RunningDriver:
    """A Driver running in a thread, with everything it emitted."""

    def __init__(self, settings: DriverSettings, planogram: Planogram = PLANOGRAM) -> None:
        self.registry = CollectorRegistry()
        self.driver = Driver(settings, self.registry, planogram)
        self.out: list = []
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.driver.run, args=(self.stop, self._emit), daemon=True)

    def _emit(self, item) -> None:
        with self._lock:
            self.out.append(item)

    def of_type(self, type_: str) -> list:
        """Return emitted items whose JSON 'type' is type_."""
        with self._lock:
            return [o for o in self.out if o.to_json()["type"] == type_]


@pytest.fixture
def running_driver() -> Iterator[Callable[..., RunningDriver]]:
    started: list[RunningDriver] = []

    def start(settings: DriverSettings, planogram: Planogram = PLANOGRAM) -> RunningDriver:
        rd = RunningDriver(settings, planogram)
        rd.thread.start()
        started.append(rd)
        return rd

    yield start
    for rd in started:
        rd.stop.set()
        rd.thread.join(5)

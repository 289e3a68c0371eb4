"""An agent event sink for pipeline tests: it records every event, alert, reading and gate metric."""

from __future__ import annotations

import threading
from typing import Any

from edge_agent.protocol import Reading


class RecordingSink:
    """What a pipeline sent to the agent, in order, safe to read from the test thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.alerts: list[tuple] = []
        self.read: list[Reading] = []
        self.gates: dict[str, tuple[float, str]] = {}
        self.lock = threading.Lock()

    def event(self, type: str, source: str, data: dict[str, Any], at: float | None = None) -> None:
        with self.lock:
            self.events.append((type, source, data))

    def alert(self, name, state, severity, source, message="", data=None) -> None:
        with self.lock:
            self.alerts.append((name, state, severity, source, message))

    def readings(self, readings: list[Reading]) -> None:
        with self.lock:
            self.read.extend(readings)

    def gate_metric(self, name: str, value: float, worse: str = "higher") -> None:
        with self.lock:
            self.gates[name] = (value, worse)

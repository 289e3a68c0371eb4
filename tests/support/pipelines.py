"""Pipelines for agent tests: small classes that satisfy ``edge_agent.supervisor.Pipeline``."""

from __future__ import annotations

import threading
from typing import Any

from edge_agent.supervisor import EventSink


class Counting:
    """A vision pipeline named cam-1 that counts how often it was started, then runs until stopped."""

    name = "cam-1"
    kind = "vision"

    def __init__(self) -> None:
        self.starts = 0

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        self.starts += 1
        stop.wait()

    def health(self) -> dict[str, Any]:
        return {"fps": 10.0}

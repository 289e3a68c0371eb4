"""Clock offset of this node against the controller, estimated from its clock beacons.

The controller publishes its time on ``Topics.controller_clock`` every few seconds. A beacon
sent at controller time ``c`` arrives at node time ``t = c - offset + delay`` with ``delay >= 0``,
so every sample ``c - t`` is the true offset minus that beacon's delay: never too high, too low
by however long the broker held it. Taking the *largest* recent sample is the classic
minimum-delay filter (as in NTP's clock filter): it picks the beacon that travelled fastest.
A window of recent samples lets the estimate follow a drifting clock and forget one old lucky
sample; it is a few kilobytes of arithmetic, cheap enough for a Pi.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable


def estimate_offset(samples: Iterable[float]) -> float | None:
    """Return controller-minus-node seconds from samples ``c - t`` (the minimum-delay one), or None."""
    best = None
    for s in samples:
        if best is None or s > best:
            best = s
    return best


class ClockOffsetEstimator:
    """Keep the last ``window`` beacon samples and estimate the offset from them. Thread-safe."""

    def __init__(self, window: int = 16) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self._samples: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, controller_ts: float, received_at: float) -> None:
        """Record a beacon stamped ``controller_ts`` that arrived at node time ``received_at``."""
        with self._lock:
            self._samples.append(controller_ts - received_at)

    def offset(self) -> float | None:
        """Return the current estimate (controller clock minus node clock), or None before any beacon."""
        with self._lock:
            return estimate_offset(self._samples)

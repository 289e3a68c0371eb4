"""A simulated door camera on a demo GPU box: shoppers come and go, health follows the release.

It is a pipeline like any other (``run(stop, sink)``, ``health()``) and reports what rollout
gates judge through the same sink API the real vision pipeline uses
(``sink.gate_metric("vision_fps", ...)``), with figures taken from the shop's
:class:`~shopfleet.sim.cluster.SimulatedCluster`: once a faulty release is applied there, the
camera slows down and the cart review rate climbs.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

from edge_agent.protocol import Reading
from edge_agent.supervisor import EventSink
from shopfleet.sim.cluster import SimulatedCluster


class SimulatedCamera:
    """A door camera that sees shoppers come and go; health follows the release applied.

    Shoppers arrive as a Poisson process and stay a random while, so occupancy (and with it the
    rollout's "no open shopper session" window) behaves like a quiet shop.
    """

    kind = "vision"

    def __init__(self, name: str, cluster: SimulatedCluster, seed: int, mean_gap_s: float = 25.0, *, report_review_rate: bool = True) -> None:
        self.name = name
        self.report_review_rate = report_review_rate  # False where a (simulated) fusion pipeline reports the real one
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.mean_gap_s = mean_gap_s
        self.inside: dict[int, float] = {}  # track id -> leaves at
        self.next_id = 1
        self._last_frame = time.time()

    def health(self) -> dict[str, Any]:
        """Return fps, latency and errors of the shop's (simulated) vision workload."""
        pipelines, _ = self.cluster.health()
        mine = next(iter(pipelines.values()), None) if pipelines else None
        out: dict[str, Any] = {"last_frame_age_s": max(time.time() - self._last_frame, 0.0)}
        if mine is not None:
            out.update(fps=mine.fps, latency_ms=mine.latency_ms, errors=mine.errors, dropped_frames=mine.dropped_frames or 0)
        else:
            out.update(fps=0.0, detail="no release applied yet")
        return out

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Send shopper events, occupancy and gate metrics every half second until ``stop``."""
        next_arrival = time.time() + self.rng.expovariate(1 / self.mean_gap_s)
        while not stop.wait(0.5):
            now = time.time()
            self._last_frame = now
            pipelines, metrics = self.cluster.health()
            for name, value in metrics.items():
                if name != "cart_review_rate" or self.report_review_rate:
                    sink.gate_metric(name, value, "higher")
            fps = [p.fps for p in pipelines.values() if p.fps is not None]
            if fps:
                sink.gate_metric("vision_fps", min(fps), "lower")
            if now >= next_arrival:
                tid = self.next_id
                self.next_id += 1
                self.inside[tid] = now + self.rng.uniform(8, 30)
                sink.event("person_entered", self.name, {"track_id": tid, "zone": "door", "direction": "in"})
                next_arrival = now + self.rng.expovariate(1 / self.mean_gap_s)
            for tid, leaves in list(self.inside.items()):
                if now >= leaves:
                    del self.inside[tid]
                    sink.event("person_exited", self.name, {"track_id": tid, "zone": "door", "direction": "out"})
            sink.readings([Reading(name="occupancy", value=float(len(self.inside)), source=self.name)])

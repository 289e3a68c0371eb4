"""Carts in the demo's simulated shops: the real fusion engine on generated scenarios, carts out through the agent.

A shop of the demo has no cameras and shelves, so :class:`SimulatedFusion` plays a generated
scenario now and then (``fusion.generate`` + ``fusion.sim``: shoppers walking through the real
tracker, shelf boards through the real frame and event code, into the real
:class:`fusion.engine.Fusion`) and sends each cart it made as the ``type: fusion`` pipeline
does: ``cart_receipt`` or ``cart_review`` through the agent's outbox, a cart id unique to this
run, and ``cart_review_rate`` for rollout gates once ``min_carts`` carts closed in the window.

The scenario mix is mostly easy visits with some hard cases (a crowd at one shelf, a put-back on
the wrong slot), so some carts go to review. While the shop runs a release its simulated cluster
treats as degraded (slow vision), the visits are played under a camera dropping to 3 fps.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from typing import Any

from edge_agent.supervisor import EventSink
from shopfleet.sim.cluster import SimulatedCluster

MIX = ("single", "single", "family", "single", "wrong-slot", "reenter", "single", "crowd")
"""Scenarios played in turn: mostly easy visits, some hard cases."""


class SimulatedFusion:
    """A fusion pipeline fed by generated scenarios instead of a shop's cameras and boards."""

    kind = "fusion"

    def __init__(self, name: str, shop: str, cluster: SimulatedCluster | None = None, *, seed: int = 0,
                 every_s: float = 20.0, window_s: float = 3600.0, min_carts: int = 5) -> None:
        self.name = name
        self.shop = shop
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.seed = seed * 1000
        self.every_s = every_s
        self.window_s = window_s
        self.min_carts = min_carts
        self.closed: deque[tuple[float, bool]] = deque()
        self.sent = {"cart_receipt": 0, "cart_review": 0}
        self.errors: dict[str, int] = {}
        self.run_id = format(int(time.time() * 1000), "x")

    def play_once(self, sink: EventSink) -> int:
        """Play one scenario and send its carts; return how many."""
        from fusion.generate import generate
        from fusion.sim import run

        name = MIX[self.seed % len(MIX)]
        if self.cluster is not None and self.cluster.mode() != "ok":
            name = "slow-camera"
        self.seed += 1
        result = run(generate(name, seed=self.seed, shoppers=3))
        for reason, n in result.errors.items():
            self.errors[f"fusion_{reason}"] = self.errors.get(f"fusion_{reason}", 0) + n
        for cart in result.carts:
            event = cart.to_event()
            kind = event.pop("type")
            event["cart_id"] = f"{self.shop}-{self.run_id}-{cart.cart_id}"
            event["shop"] = self.shop
            for a in event.get("attributions", []):
                if a.get("cart_id"):
                    a["cart_id"] = f"{self.shop}-{self.run_id}-{a['cart_id']}"
            event["scenario"] = name
            sink.event(kind, self.name, event)
            self.sent[kind] += 1
            self.closed.append((time.time(), kind == "cart_review"))
        return len(result.carts)

    def review_rate(self) -> float | None:
        """Return carts sent to review / carts closed over the window, once ``min_carts`` closed in it."""
        cutoff = time.time() - self.window_s
        while self.closed and self.closed[0][0] < cutoff:
            self.closed.popleft()
        if len(self.closed) < self.min_carts:
            return None
        return sum(r for _, r in self.closed) / len(self.closed)

    def run(self, stop: threading.Event, sink: EventSink) -> None:
        """Play a scenario every ``every_s`` (jittered) until ``stop``."""
        wait = self.rng.uniform(1.0, self.every_s / 2)
        while not stop.wait(wait):
            self.play_once(sink)
            rate = self.review_rate()
            if rate is not None:
                sink.gate_metric("cart_review_rate", rate, "higher")
            wait = self.every_s * self.rng.uniform(0.7, 1.3)

    def health(self) -> dict[str, Any]:
        """Return carts made and fusion's error counts."""
        return {"detail": f"{self.sent['cart_receipt']} receipts, {self.sent['cart_review']} to review (simulated shoppers)",
                "errors": sum(self.errors.values()), "errors_by_reason": dict(self.errors)}

"""Many simulated shops over a real MQTT broker: for the demo, the fleet-scale tests and the bench.

Each :class:`SimulatedShop` is what a shop's applying agent does, minus Kubernetes: it verifies the
signed desired state with the real :class:`~edge_agent.apply.handler.DesiredStateHandler` (replay
protection included), applies it to a :class:`~shopfleet.sim.cluster.SimulatedCluster`, and
sends ``ReportedState``, heartbeats (pipeline fps and errors, ``cart_review_rate``) and telemetry
(``occupancy``, ``door_open``) like a real node. :class:`SimulatedFleet` multiplexes hundreds of
shops over a few MQTT connections of the project's MQTT core (one per shop would be hundreds of
network threads on a 2-core machine) and applies desired states on one worker thread, so each shop sees its messages in order.
Which releases misbehave is the fleet's own ``faults`` (see :mod:`shopfleet.sim.cluster`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge_agent.apply.handler import ApplyMetrics, ApplyReport, DesiredStateHandler
from edge_agent.apply.verify import RevisionStore, Verifier
from edge_agent.mqtt_core import InMessage, MqttSettings, ThreadedLink
from edge_agent.protocol import (
    Channel,
    DesiredState,
    Heartbeat,
    NodeFacts,
    Presence,
    ProtocolError,
    Reading,
    Telemetry,
    Topics,
    encode,
    parse_downlink,
)
from shopfleet.sim.cluster import FaultMode, SimulatedCluster

log = logging.getLogger(__name__)

NODE = "node-1"
FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.3, mem_total_bytes=4 << 30,
                  mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30, agent_version="sim")


class SimulatedShop:
    """One shop with one node: verifies, applies (simulated), reports, heartbeats."""

    def __init__(self, shop: str, verifier: Verifier, state_dir: Path, publish: Callable[..., object], *, seed: int = 0,
                 faults: Mapping[str, FaultMode] | None = None) -> None:
        self.shop = shop
        self._publish = publish  # a link's publish_nowait(topic, payload, retain=...)
        self.applier = SimulatedCluster(nodes=1, cameras=2, seed=seed, faults=faults)
        self.metrics_registry = CollectorRegistry()
        self.handler = DesiredStateHandler(
            shop, verifier, RevisionStore(state_dir / f"{shop}.json"), self.applier, self._report,
            metrics=ApplyMetrics(self.metrics_registry), ready_timeout_s=0.5, poll_interval_s=0.05,
        )
        self.epoch = uuid.uuid4().hex[:12]
        self._seq = 0
        self._lock = threading.Lock()
        self.busy_until = 0.0
        self.history: list[tuple[float, int, str, str]] = []  # (at, revision, release, final status)
        self.applied_while_busy = 0
        self.parse_errors = 0

    def _next(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._publish(topic, payload, retain=retain)

    def _report(self, report: ApplyReport) -> None:
        self._send(Topics.reported(self.shop, NODE), encode(report.to_message(self.shop, NODE, self.epoch, self._next())), retain=True)

    def birth(self) -> None:
        """Announce the node online (retained, as the agent's birth)."""
        self._send(Topics.node(self.shop, NODE, Channel.PRESENCE), encode(Presence(shop=self.shop, node=NODE, state="online", session=1)), retain=True)

    def busy(self, now: float | None = None) -> bool:
        """Return whether a shopper is inside right now."""
        return (time.time() if now is None else now) < self.busy_until

    def on_desired(self, state: DesiredState) -> ApplyReport:
        """Handle one desired state (on the fleet's worker thread)."""
        if self.busy() and state.signature is not None:
            self.applied_while_busy += 1
        final = self.handler.handle(state)
        self.history.append((time.time(), state.revision, state.release, final.status))
        return final

    def heartbeat(self, interval_s: float) -> None:
        """Send one heartbeat and one telemetry message."""
        pipelines, metrics = self.applier.health()
        hb = Heartbeat(shop=self.shop, node=NODE, epoch=self.epoch, seq=self._next(), interval_s=interval_s, facts=FACTS,
                       pipelines=pipelines, metrics=metrics, release=self.applier.release())
        self._send(Topics.node(self.shop, NODE, Channel.TELEMETRY), encode(hb))
        busy = 1.0 if self.busy() else 0.0
        tel = Telemetry(shop=self.shop, node=NODE, epoch=self.epoch, seq=self._next(),
                        readings=(Reading(name="occupancy", value=busy, source="door-cam"), Reading(name="door_open", value=0.0, source="door-1")))
        self._send(Topics.node(self.shop, NODE, Channel.TELEMETRY), encode(tel))


class SimulatedFleet:
    """Hundreds of :class:`SimulatedShop` on a few MQTT connections; ``start()``/``stop()``.

    ``faults`` (release name or image reference -> fault mode) is what every shop's simulated
    cluster treats as a bad release.
    """

    def __init__(self, shops: Iterable[str], verifier: Verifier, state_dir: Path, *, host: str, port: int,
                 connections: int = 4, heartbeat_interval_s: float = 1.0, faults: Mapping[str, FaultMode] | None = None) -> None:
        self.host, self.port = host, port
        self.heartbeat_interval_s = heartbeat_interval_s
        state_dir.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        tag = uuid.uuid4().hex[:8]
        # The first connection also listens for every shop's desired state; the others only publish.
        self.links = [
            ThreadedLink(MqttSettings(host=host, port=port, client_id=f"simfleet-{tag}-{i}", max_inflight=200),
                         self._received, subscriptions=(f"{Topics.root}/+/state/desired",) if i == 0 else ())
            for i in range(connections)
        ]
        names = list(shops)
        self.shops = {s: SimulatedShop(s, verifier, state_dir, self.links[i % connections].publish_nowait, seed=i, faults=faults)
                      for i, s in enumerate(names)}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.messages_in = 0
        self.bad_messages = 0

    def _received(self, message: InMessage) -> None:
        self._queue.put((message.topic, message.payload))

    def start(self, timeout: float = 15.0) -> None:
        """Connect, announce every node, subscribe to desired states, start heartbeats."""
        for link in self.links:
            link.start()
        deadline = time.monotonic() + timeout
        for link in self.links:  # raises ConnectRefused / ConnectFailed with the reason
            link.wait_connected(max(0.1, deadline - time.monotonic()))
        for s in self.shops.values():
            s.birth()
        self._threads = [threading.Thread(target=self._work, name="simfleet-apply", daemon=True),
                         threading.Thread(target=self._beat, name="simfleet-heartbeat", daemon=True)]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, payload = item
            self.messages_in += 1
            try:
                state = parse_downlink(topic, payload)
            except ProtocolError as exc:
                self.bad_messages += 1
                log.warning("simulated fleet: bad desired state on %s: %s", topic, exc)
                continue
            if not isinstance(state, DesiredState):
                continue
            shop = self.shops.get(state.shop)
            if shop is not None:
                shop.on_desired(state)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            for s in self.shops.values():
                s.heartbeat(self.heartbeat_interval_s)

    def stop(self) -> None:
        """Stop heartbeats and the worker, disconnect."""
        self._stop.set()
        self._queue.put(None)
        for t in self._threads:
            t.join(10)
        for link in self.links:
            link.stop()

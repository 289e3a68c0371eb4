"""Node-affine intake for controller replicas: shops split into partitions leased through the database.

With ``intake.partitions: P`` (and ``broker.shared_group``, MQTT 5) a replica does not subscribe
to the whole stream. It holds some of the ``P`` partitions by lease
(:mod:`fleet_controller.registry.leases`) and subscribes, on its own persistent session, to the
five uplink topics of every shop of those partitions (``fleet/v1/<shop>/+/presence``,
``.../telemetry``, ``.../events``, ``.../replies``, ``.../state``). So each node's messages reach
one replica and one writer: the replicas no longer race on the same cursors, and a second replica
adds capacity. Why by shop: topics are per shop (``fleet/v1/<shop>/<node>/<kind>``), MQTT filters
cannot hash, and Mosquitto's shared subscriptions only deal round-robin (EMQX's ``sticky`` or
``hash_clientid`` strategies would need another broker).

**Discovery.** A shop the registry does not know yet belongs to nobody's subscriptions. Every
replica also subscribes ``$share/<group>/fleet/v1/+/+/presence`` (subscription identifier
:data:`SUB_DISCOVERY`): a presence message of an unknown shop is stored by whichever replica the
broker deals it to (which creates the shop); its owner subscribes on its next tick and gets the
node's retained birth. The discovery copy of a known shop's presence is acknowledged and dropped
(the owner's subscription, identifier :data:`SUB_SHOPS`, delivers it).

**Rebalancing.** Every ``ttl / 3`` seconds each replica runs :meth:`LeaseBook.tick`: quotas
follow the live members, so a joining replica takes its share within a tick or two and a dead
one's leases are claimed once they expire (``intake.lease_ttl_s``). A claim subscribes the
partition's shops (retained messages included: the nodes' latest presence) and, once the broker
confirmed, marks the lease ``active``. A replica that released or lost a partition keeps its
subscriptions until another replica holds it ``active``: a hand-over overlaps, both replicas may
store the same message meanwhile, and the per-node compare-and-set cursors keep that exact (one
row, counted once).

**What a hand-over guarantees.** Graceful (a replica joins, or stops with SIGTERM): nothing lost
whatever the agents' ack mode, thanks to the overlap. A replica killed (SIGKILL, host lost):
messages of its shops that its session held unacknowledged, or that were published between its
death and the new owner's SUBACK, are in the dead replica's session only, which the broker drops
``SHARED_SESSION_EXPIRY_S`` after the connection died (or delivers to that replica if it comes
back sooner). Agents with ``uplink.ack: controller`` (controllers with ``intake.ack_nodes``) keep
every message until a stored-ack covers it and send it again after ``uplink.ack_timeout_s``, to
the new owner: nothing lost, nothing stored twice, gap counts exact. With ``uplink.ack: broker``
those messages are lost (counted as missing), so run partitioned replicas with the stored-ack.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from edge_agent.protocol import TOPIC_ROOT, Channel
from fleet_controller.intake.mqtt import InboundMessage, MqttAdapter, MqttError
from fleet_controller.registry.leases import LeaseBook, TickResult, partition_of
from fleet_controller.registry.store import SHOPS

log = logging.getLogger(__name__)

SUB_DISCOVERY = 1
"""MQTT 5 subscription identifier of the shared presence subscription that finds new shops."""
SUB_SHOPS = 2
"""Subscription identifier of the per-shop subscriptions of held partitions."""
SUB_DRAIN = 3
"""Subscription identifier of a stopping replica's own drain marker topic."""

UPLINK_CHANNELS = (Channel.PRESENCE, Channel.TELEMETRY, Channel.EVENTS, Channel.REPLIES, Channel.STATE)


def shop_topics(shop: str) -> list[str]:
    """Return the filters of everything a shop's nodes send (the controller's subscriptions, for one shop)."""
    return [f"{TOPIC_ROOT}/{shop}/+/{ch.value}" for ch in UPLINK_CHANNELS]


def discovery_filter(group: str) -> str:
    """Return the shared presence subscription every replica holds to find shops nobody subscribes to yet."""
    return f"$share/{group}/{TOPIC_ROOT}/+/+/{Channel.PRESENCE.value}"


def drain_topic(replica: str) -> str:
    """Return the topic a stopping replica sends itself a marker on (only the controller user may use it)."""
    return f"{TOPIC_ROOT}/_controller/drain/{re.sub(r'[^A-Za-z0-9_.-]', '_', replica)}"


def shop_of(topic: str) -> str | None:
    """Return the shop of an uplink topic ``fleet/v1/<shop>/<node>/<kind>`` (None for another shape)."""
    parts = topic.split("/")
    return parts[2] if len(parts) == 5 else None


@dataclass
class RouterStatus:
    """What the router holds now (for logs, tests and the bench)."""

    held: list[int]
    draining: list[int]
    shops: int
    live: list[str]


class PartitionRouter:
    """One replica's side of partitioned intake: leases, per-shop subscriptions, the discovery gate."""

    def __init__(self, engine: Engine, mqtt: MqttAdapter, *, replica: str, partitions: int, ttl_s: float, group: str,
                 registry: CollectorRegistry | None = None) -> None:
        self.engine = engine
        self.mqtt = mqtt
        self.replica = replica
        self.partitions = partitions
        self.ttl_s = ttl_s
        self.tick_s = min(1.0, ttl_s / 3)
        self.group = group
        self.book = LeaseBook(engine, replica, partitions, ttl_s)
        self.known: frozenset[str] = frozenset()  # shops in the registry (read on the network thread: swapped whole)
        self._known_count = -1
        self._held: dict[int, int] = {}
        self._active: dict[int, int] = {}  # partition -> generation marked active
        self._reported: dict[int, tuple[int, int]] = {}  # partition -> (generation, shops) last written
        self._draining: dict[int, float] = {}  # released or lost partition -> since
        self._subscribed: set[str] = set()  # shops whose subscriptions the broker confirmed
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()  # a tick and the hand-over at stop never interleave
        self._stopping = False
        self._last_ok = 0.0
        self._drain_topic = drain_topic(replica)
        self._drained = threading.Event()
        self.last: TickResult | None = None
        registry = registry if registry is not None else CollectorRegistry()
        self.m_held = Gauge("shopfleet_controller_intake_partitions_held", "intake partitions this replica holds", registry=registry)
        self.m_claims = Counter("shopfleet_controller_intake_partition_claims_total", "intake partitions claimed (after a join, release or expiry)", registry=registry)
        self.m_releases = Counter("shopfleet_controller_intake_partition_releases_total", "intake partitions released to rebalance", registry=registry)
        self.m_dropped = Counter("shopfleet_controller_intake_discovery_dropped_total", "discovery copies of known shops' presence dropped (their owner's subscription delivers them)", registry=registry)
        self.m_late_renewals = Counter("shopfleet_controller_intake_lease_late_renewals_total",
                                       "lease renewals made while a partition tick was still busy (waiting on the broker)", registry=registry)
        mqtt.gate = self.gate
        mqtt.add_connect_hook(self._on_connect)

    # ----- network thread ------------------------------------------------------------------------

    def gate(self, message: InboundMessage, ids: tuple[int, ...]) -> bool:
        """Keep a message unless it came only through discovery for a shop the registry already knows."""
        if message.topic == self._drain_topic:
            self._drained.set()
            return False
        if not ids or SUB_SHOPS in ids:
            return True
        shop = shop_of(message.topic)
        if shop is not None and shop in self.known:
            self.m_dropped.inc()
            return False
        return True

    def _on_connect(self, session_present: bool) -> None:
        """(Re)subscribe discovery and every confirmed shop without waiting (this is the network thread)."""
        try:
            self.mqtt.subscribe_topics([discovery_filter(self.group)], sub_id=SUB_DISCOVERY, wait=False)
            with self._lock:
                topics = [t for s in sorted(self._subscribed) for t in shop_topics(s)]
            if topics:
                self.mqtt.subscribe_topics(topics, sub_id=SUB_SHOPS, retain_handling=1, wait=False)
        except MqttError as exc:
            log.warning("partitions: re-subscribing after a connection failed: %s; the next tick retries", exc)

    # ----- ticks (a worker thread) ---------------------------------------------------------------

    def start(self) -> None:
        """Create the partition rows (refusing a count other live replicas disagree with)."""
        self.book.ensure_partitions(time.time())

    async def run(self) -> None:
        """Tick until cancelled; a failing tick is logged and retried (leases expire if it keeps failing).

        A keeper renews the leases meanwhile whenever the tick is late: a tick waits for the
        broker's answers to its (un)subscriptions, and under load (a flood of 16,000 shops to
        subscribe, or a paused intake that reads nothing from the broker) that wait can outlast
        ``intake.lease_ttl_s``. Before the keeper, the leases lapsed, the other replica claimed
        them, and both stored the same shops until the ticks caught up (bench/scale.py saw it).
        """
        # The keeper starts a tick later: before the first tick there is nothing to renew.
        keeper = asyncio.create_task(self._repeat(self.renew_if_late, "renewing the leases", first_after=self.tick_s),
                                     name="partition-lease-keeper")
        try:
            await self._repeat(self.tick, "tick")
        finally:
            keeper.cancel()

    async def _repeat(self, job: Callable[[], object], what: str, *, first_after: float = 0.0) -> None:
        """Run ``job`` in a worker thread every ``tick_s`` until cancelled; a failure is logged and retried."""
        await asyncio.sleep(first_after)
        while True:
            try:
                await asyncio.to_thread(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("partitions: %s failed (%s); retrying in %.1fs", what, exc, self.tick_s)
            await asyncio.sleep(self.tick_s)

    def renew_if_late(self, now: float | None = None) -> bool:
        """Renew the held leases if the last tick's renewal is older than a tick; return whether it renewed."""
        now = time.time() if now is None else now
        if self._stopping or now - self._last_ok < self.tick_s:
            return False
        self.book.renew(now)
        self._last_ok = now
        self.m_late_renewals.inc()
        return True

    def tick(self) -> RouterStatus:
        """One round: leases, shops, subscriptions, activation and the end of drained hand-overs."""
        with self._tick_lock:
            if self._stopping:
                return self.status()
            return self._tick()

    def _tick(self) -> RouterStatus:
        now = time.time()
        res = self.book.tick(now)
        self.last = res
        self._last_ok = now
        for p in res.claimed:
            log.info("partitions: %s claimed partition %d (quota %d of %d, live %s)", self.replica, p, res.quota,
                     self.partitions, res.live)
        self.m_claims.inc(len(res.claimed))
        self.m_releases.inc(len(res.released))
        for p in [*res.released, *res.lost]:
            self._draining.setdefault(p, now)
            self._active.pop(p, None)
        for p in res.held:
            self._draining.pop(p, None)
        self._held = dict(res.held)
        self.m_held.set(len(self._held))
        self._refresh_known()
        if self._draining:
            owners = self.book.owners(self._draining, now)
            for p, (owner, active) in owners.items():
                if owner is not None and owner != self.replica and active:
                    self._draining.pop(p, None)
        keep = set(self._held) | set(self._draining)
        want = {s for s in self.known if partition_of(s, self.partitions) in keep}
        with self._lock:
            add = sorted(want - self._subscribed)
            drop = sorted(self._subscribed - want)
        if self.mqtt.connected:
            if add:
                self.mqtt.subscribe_topics([t for s in add for t in shop_topics(s)], sub_id=SUB_SHOPS, retain_handling=1)
                with self._lock:
                    self._subscribed.update(add)
            if drop:
                self.mqtt.unsubscribe_topics([t for s in drop for t in shop_topics(s)])
                with self._lock:
                    self._subscribed.difference_update(drop)
            for p, gen in self._held.items():
                if self._active.get(p) != gen and self.book.activate(p, gen):
                    self._active[p] = gen
            counts = dict.fromkeys(self._held, 0)
            with self._lock:
                for shop in self._subscribed:
                    p = partition_of(shop, self.partitions)
                    if p in counts:
                        counts[p] += 1
            changed = {p: n for p, n in counts.items() if self._reported.get(p) != (self._held[p], n)}
            if changed:
                self.book.report_shops(changed)
                self._reported.update({p: (self._held[p], n) for p, n in changed.items()})
        return self.status()

    def _refresh_known(self) -> None:
        with self.engine.connect() as c:
            count = int(c.scalar(select(func.count()).select_from(SHOPS)) or 0)
            if count != self._known_count:
                self.known = frozenset(c.scalars(select(SHOPS.c.id)))
                self._known_count = count

    def status(self) -> RouterStatus:
        """Return what this replica holds now."""
        with self._lock:
            shops = len(self._subscribed)
        return RouterStatus(held=sorted(self._held), draining=sorted(self._draining), shops=shops,
                            live=list(self.last.live) if self.last else [])

    def swept_shops(self) -> list[str]:
        """Return the shops whose presence this replica judges: the known shops of the partitions it holds.

        Each replica sweeps only these (:meth:`RegistryStore.sweep_presence`), so every shop is
        judged by the one replica whose writer stores its stream, against that writer's horizon. A
        partition being handed over is judged by its new holder; a dead replica's, once its leases
        expired and another claimed them (``intake.lease_ttl_s``).
        """
        held = set(self._held)
        return sorted(s for s in self.known if partition_of(s, self.partitions) in held)

    def subscribed_shops(self) -> Iterable[str]:
        """Return the shops whose subscriptions the broker confirmed."""
        with self._lock:
            return sorted(self._subscribed)

    async def stop(self, handover_timeout_s: float | None = None) -> None:
        """Hand over cleanly: release every lease, keep receiving until others hold them active, leave."""
        timeout = 2 * self.ttl_s + 2 if handover_timeout_s is None else handover_timeout_s
        try:
            await asyncio.to_thread(self._handover, timeout)
        except Exception as exc:  # the others take over after the leases expire anyway
            log.warning("partitions: clean hand-over failed (%s); other replicas take over when the leases expire", exc)

    def _handover(self, timeout: float) -> None:
        with self._tick_lock:
            self._stopping = True
            held = list(self._held)
            self.book.leave()
        self._held = {}
        self.m_held.set(0)
        if not held:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = time.time()
            owners = self.book.owners(held, now)
            # Members renewed within the last TTL count: a loaded replica's tick may be late by a second or two.
            live = [r for r in self.book.tick_live(now - self.ttl_s) if r != self.replica]
            if not live:
                log.info("partitions: no other replica is live; %d partitions stay free until one starts", len(held))
                return
            if all(o is not None and o != self.replica and a for o, a in owners.values()):
                log.info("partitions: %d partitions handed over; draining what the broker queued for this replica", len(held))
                self._drain(time.monotonic() + max(10.0, timeout))
                return
            time.sleep(0.1)
        log.warning("partitions: hand-over of %d partitions not confirmed within %.0fs", len(held), timeout)

    def _drain(self, deadline: float) -> None:
        """Stop new messages of our shops, then store everything the session queued before that.

        After the UNSUBACK no message of our shops enters this replica's session; a marker
        published to ourselves then queues behind everything that did (Mosquitto delivers one
        session's queue in order), so once it arrives and the intake has answered every message
        delivered, nothing is left behind for the dropped session.
        """
        with self._lock:
            shops = sorted(self._subscribed)
        if not self.mqtt.connected:
            return
        self.mqtt.unsubscribe_topics([t for s in shops for t in shop_topics(s)])
        with self._lock:
            self._subscribed.clear()
        self.mqtt.subscribe_topics([self._drain_topic], sub_id=SUB_DRAIN, retain_handling=2)
        self.mqtt.publish_sync(self._drain_topic, b"drain", qos=1)
        while time.monotonic() < deadline:
            if self._drained.is_set() and self.mqtt.settled >= self.mqtt.delivered:
                log.info("partitions: drained (%d messages answered)", self.mqtt.settled)
                return
            time.sleep(0.05)
        log.warning("partitions: drain not finished before the hand-over deadline (%d of %d messages answered)",
                    self.mqtt.settled, self.mqtt.delivered)

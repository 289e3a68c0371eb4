"""Prometheus metrics of the fleet controller, on a registry the caller passes in.

One class holds every metric so the intake, the service and the API share one set, and a test
passes a private ``CollectorRegistry`` (client_python's own pattern) instead of reading global
state. Names follow Prometheus conventions: ``shopfleet_controller_<thing>_total`` for counters,
``_seconds`` for durations; label values are bounded (message kinds, reject reasons, presence
states), never shop or node ids, so 10,000 nodes do not mean 10,000 series. Per-node counts of
gaps and duplicates are in the registry and the API instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_agent.protocol import REJECT_REASONS

PRESENCE_STATES = ("online", "stale", "offline", "unknown")
INTAKE_REJECT_REASONS = (*REJECT_REASONS, "seq_jump", "stale_epoch", "session_jump", "unknown_node")
QUARANTINE_REASONS = ("store", "writer", "unexpected", "lost")


class _PresenceCollector(Collector):
    """``shopfleet_controller_nodes{presence}``, read from the registry at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("shopfleet_controller_nodes", "Nodes in the registry by presence.", labels=["presence"])
        counts = self._counts()
        for state in PRESENCE_STATES:
            g.add_metric([state], counts.get(state, 0))
        yield g


class ControllerMetrics:
    """Every metric the controller exports, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.ingested = Counter(
            "shopfleet_controller_ingested", "Messages validated and stored, by kind.", ["kind"], registry=registry
        )
        self.rejected = Counter(
            "shopfleet_controller_rejected", "Messages dropped as invalid, by reason.", ["reason"], registry=registry
        )
        for reason in INTAKE_REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self.quarantined = Counter(
            "shopfleet_controller_quarantined",
            "Messages kept in the dead-letter table because storing them failed, by reason (lost: even that failed).",
            ["reason"], registry=registry,
        )
        for reason in QUARANTINE_REASONS:
            self.quarantined.labels(reason=reason)
        self.seq_rebases = Counter(
            "shopfleet_controller_seq_rebases",
            "Node streams that continued beyond intake.max_seq_jump for intake.seq_resync_after messages and were rebased.",
            registry=registry,
        )
        self.duplicates = Counter(
            "shopfleet_controller_duplicates", "Messages dropped because their (epoch, seq) was already stored.", registry=registry
        )
        self.gaps = Counter(
            "shopfleet_controller_gaps", "Sequence numbers found missing (skipped) in nodes' streams.", registry=registry
        )
        self.gaps_filled = Counter(
            "shopfleet_controller_gaps_filled", "Late messages that filled a gap.", registry=registry
        )
        self.evicted = Counter(
            "shopfleet_controller_evicted",
            "Seqs nodes reported their outbox evicted unsent, by eviction priority (counted apart from gaps).",
            ["priority"], registry=registry,
        )
        self.cursor_conflicts = Counter(
            "shopfleet_controller_cursor_conflicts",
            "Batches decided again because another controller replica moved a node's cursor meanwhile.",
            registry=registry,
        )
        self.intake_paused = Gauge(
            "shopfleet_controller_intake_paused", "1 while the intake queue is above intake.max_queue and reading is paused.",
            registry=registry,
        )
        self.acks_published = Counter(
            "shopfleet_controller_stored_acks", "Stored-acks published to nodes (one per node per batch).", registry=registry
        )
        self.ingest_latency = Histogram(
            "shopfleet_controller_ingest_latency_seconds",
            "Time from receiving a message to committing it.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.batch_size = Histogram(
            "shopfleet_controller_batch_messages",
            "Messages per stored batch (one transaction each).",
            buckets=(1, 10, 50, 100, 200, 500, 1000, 5000),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "shopfleet_controller_batch_seconds",
            "Time to parse, dedupe and store one batch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
            registry=registry,
        )
        self.intake_queue = Gauge(
            "shopfleet_controller_intake_queue_messages", "Messages received and waiting for a batch.", registry=registry
        )
        self.store_errors = Counter(
            "shopfleet_controller_store_errors", "Batches the database failed to store, by kind.", ["kind"], registry=registry
        )
        self.mqtt_connected = Gauge("shopfleet_controller_mqtt_connected", "1 while connected to the broker.", registry=registry)
        self.mqtt_reconnects = Counter("shopfleet_controller_mqtt_reconnects", "Connections after the first.", registry=registry)
        self.presence_changes = Counter(
            "shopfleet_controller_presence_changes", "Presence transitions, by new state.", ["presence"], registry=registry
        )
        self.presence_sweeps_capped = Counter(
            "shopfleet_controller_presence_sweeps_capped",
            "Presence sweeps that found more silent nodes than presence.sweep_max_changes and left the rest to the next sweeps.",
            registry=registry,
        )
        self.bus_dropped = Counter(
            "shopfleet_controller_bus_dropped", "Event-bus messages dropped because a subscriber's queue was full.", registry=registry
        )
        self.worker_restarts = Counter(
            "shopfleet_controller_worker_restarts", "Background worker restarts after a crash, by worker.", ["worker"], registry=registry
        )
        self.retention_deleted = Counter(
            "shopfleet_controller_retention_deleted_rows", "History rows deleted by retention, by table.", ["table"], registry=registry
        )

    def watch_presence(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export ``shopfleet_controller_nodes{presence}`` computed by ``counts`` at scrape time."""
        self.registry.register(_PresenceCollector(counts))

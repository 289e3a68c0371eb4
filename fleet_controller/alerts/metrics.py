"""Prometheus metrics of alerting, registered on the registry passed in."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet_controller.alerts.channels import NotificationMetrics
from fleet_controller.alerts.store import AlertView


class AlertMetrics:
    """Counters and gauges of the alert worker and the webhook."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.firing = Gauge("shopfleet_alerts_firing", "Alerts firing now, by rule and severity.", ["rule", "severity"], registry=registry)
        self.opened = Counter("shopfleet_alerts_opened_total", "Alerts that started firing, by rule.", ["rule"], registry=registry)
        self.resolved = Counter("shopfleet_alerts_resolved_total", "Alerts that cleared, by rule.", ["rule"], registry=registry)
        self.evaluation_seconds = Histogram(
            "shopfleet_alerts_evaluation_seconds", "Time of one evaluation (snapshot, rules, store).", registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.evaluation_errors = Counter(
            "shopfleet_alerts_evaluation_errors_total", "Evaluations that failed, by reason (database, rules, other).",
            ["reason"], registry=registry,
        )
        self.webhook_sent = Counter("shopfleet_alerts_webhook_sent_total", "Webhook deliveries that succeeded.", registry=registry)
        self.webhook_failures = Counter(
            "shopfleet_alerts_webhook_failures_total", "Webhook deliveries given up, by reason (timeout, connect, http_status).",
            ["reason"], registry=registry,
        )
        self.flaps = Counter("shopfleet_alerts_flaps_total", "Alerts whose condition came back within resolve_after_s, by rule.",
                             ["rule"], registry=registry)
        self.notifications = NotificationMetrics(registry)

    def set_firing(self, alerts: Iterable[AlertView]) -> None:
        """Set the firing gauge from the complete list of firing alerts."""
        tally = Tally((a.rule, a.severity) for a in alerts)
        self.firing.clear()
        for (rule, severity), n in tally.items():
            self.firing.labels(rule, severity).set(n)

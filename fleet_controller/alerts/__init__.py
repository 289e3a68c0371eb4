"""Alerts: rules an operator sets in YAML, a pure evaluator, storage, metrics and a webhook.

``rules`` loads and checks the YAML; ``evaluator`` decides, as a pure function over a snapshot
of the registry, which alerts fire now; ``store`` keeps them in SQL (deduplicated by key,
resolved when the condition clears, acknowledged and silenced by operators); ``webhook`` tells
the outside world; ``worker`` ties them together on the controller's loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet_controller.alerts.rules import AlertRules
    from fleet_controller.alerts.worker import AlertWorker
    from fleet_controller.host import ControllerHost


def install(host: ControllerHost, rules: AlertRules, *, dashboard_url: str = "") -> AlertWorker:
    """Run the alert worker on a controller: evaluate ``rules`` on the registry, announce changes on the bus.

    ``dashboard_url`` is the dashboard's external address, for the links in webhook messages.
    Call before ``start()``; return the worker (tests and the demo reach it).
    """
    from fleet_controller.alerts.metrics import AlertMetrics
    from fleet_controller.alerts.worker import AlertWorker
    from fleet_controller.registry.bus import BusEvent

    def publish(topic: str, data: dict[str, Any]) -> None:
        host.bus.publish(BusEvent(topic, data.get("shop", ""), data.get("node"), data))

    worker = AlertWorker(host.reader, rules, AlertMetrics(host.metrics_registry), publish=publish, dashboard_url=dashboard_url)
    host.add_worker("alerts", worker.run)
    return worker

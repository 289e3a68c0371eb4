"""Send alert changes to a webhook as JSON, with retries, never raising into the worker.

The payload is one alert per request, shaped like an Alertmanager notification
(``status`` firing/resolved, ``labels``, ``annotations``, ``startsAt``/``endsAt``) so common
receivers (chat bridges, incident tools) take it without glue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from fleet_controller.alerts.channels import webhook_payload
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.alerts.rules import Webhook
from fleet_controller.alerts.store import AlertView

log = logging.getLogger(__name__)


def payload(alert: AlertView, dashboard_url: str = "") -> dict[str, Any]:
    """Return the JSON body sent for ``alert`` (the same as a webhook channel's)."""
    return webhook_payload(alert, dashboard_url)


async def send(client: httpx.AsyncClient, config: Webhook, alert: AlertView, metrics: AlertMetrics,
               dashboard_url: str = "", base_delay_s: float = 0.5) -> bool:
    """POST one alert to the webhook, retrying with doubling delay; return whether it was accepted."""
    reason = "other"
    for attempt in range(config.retries + 1):
        if attempt:
            await asyncio.sleep(base_delay_s * 2 ** (attempt - 1))
        try:
            resp = await client.post(config.url, json=payload(alert, dashboard_url), headers=config.headers,
                                     timeout=config.timeout_s)
            if resp.status_code < 300:
                metrics.webhook_sent.inc()
                return True
            reason = "http_status"
            log.warning("webhook %s answered %s for alert %s (attempt %d)", config.url, resp.status_code, alert.key, attempt + 1)
            if 400 <= resp.status_code < 500 and resp.status_code not in (408, 429):
                break  # the receiver refuses this payload; retrying will not help
        except httpx.TimeoutException:
            reason = "timeout"
            log.warning("webhook %s timed out for alert %s (attempt %d)", config.url, alert.key, attempt + 1)
        except httpx.HTTPError as exc:
            reason = "connect"
            log.warning("webhook %s failed for alert %s (attempt %d): %s", config.url, alert.key, attempt + 1, exc)
    metrics.webhook_failures.labels(reason).inc()
    return False

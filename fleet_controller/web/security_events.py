"""``POST /api/v1/security-events``: FalcoSidekick's webhook, each Falco event turned into an alert.

Falco runs in every shop's cluster and FalcoSidekick posts each event it sees (JSON: ``output``,
``priority``, ``rule``, ``time``, ``output_fields`` with ``k8s.ns.name``, ``k8s.pod.name``,
``container.name``..., ``hostname``) here. The caller needs permission ``security:ingest``: the
role ``security-ingest`` has it and nothing else, so the API token stored in a shop's cluster
(Secret ``falcosidekick``) can post events and do nothing more.

Each event becomes an alert of rule ``security:<rule slug>`` through
:func:`fleet_controller.alerts.store.record_event`: the same event again (same rule, shop, node,
namespace and container) folds into the open alert and counts, and the alert resolves once no
such event came for an hour (``store.EVENT_QUIET_S``). Severity follows Falco's priority.

The shop is, in this order: the event's ``shopfleet.shop`` field (Sidekick's ``CUSTOMFIELDS``,
set per shop in its Secret), else the one shop that has a node named like the event's
``hostname`` (nodes are named after their Kubernetes node), else none: a fleet-level alert
(shop ``""``) whose summary says the shop is unknown, so nothing is dropped.

A body that is too large, not JSON or not a Falco event is refused with a 4xx that names the
problem and the fix, and counted in ``shopfleet_controller_security_events_rejected_total{reason}``;
accepted events are counted in ``shopfleet_controller_security_events_total{rule,priority}``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet_controller.alerts import store
from fleet_controller.alerts.evaluator import Firing, alert_key
from fleet_controller.host import ControllerHost
from fleet_controller.registry.bus import BusEvent

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""A Falco event is a few KiB; anything larger is not one (and must not cost the controller memory)."""

PRIORITY_SEVERITY: dict[str, str] = {
    "emergency": "critical",
    "alert": "critical",
    "critical": "critical",
    "error": "critical",
    "warning": "warning",
    "notice": "info",
    "informational": "info",
    "info": "info",
    "debug": "info",
}
"""Falco's priorities (case-insensitive) -> alert severity."""

RUNBOOK = ("A Falco rule fired in a shop's cluster: read the event's details (process, file, connection). "
           "If it is not planned maintenance, isolate the node (cordon it, take it off the shop LAN) and keep "
           "its disk for investigation before restarting anything.")

_SLUG = re.compile(r"[^a-z0-9]+")
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,252})?$")


class FalcoEvent(BaseModel):
    """One event as FalcoSidekick posts it; fields Sidekick adds and we do not use (uuid, tags, source) are ignored."""

    model_config = ConfigDict(extra="ignore")

    output: str = Field(max_length=8192, description="Falco's rendered output line.")
    priority: str = Field(description="Falco priority: Emergency, Alert, Critical, Error, Warning, Notice, Informational, Debug.")
    rule: str = Field(min_length=1, max_length=200, description="The Falco rule's name.")
    time: datetime = Field(description="When Falco saw the event (RFC 3339).")
    output_fields: dict[str, str | int | float | bool | list[str | int | float] | None] = Field(default_factory=dict, max_length=128)
    hostname: str = Field("", max_length=253, description="The Kubernetes node Falco runs on.")

    @field_validator("priority")
    @classmethod
    def _known_priority(cls, v: str) -> str:
        if v.lower() not in PRIORITY_SEVERITY:
            raise ValueError(f"unknown priority {v!r}: use one of Falco's {', '.join(p.capitalize() for p in PRIORITY_SEVERITY)}")
        return v.lower()

    def field(self, name: str) -> str:
        """Return output field ``name`` as text ("" when absent or null)."""
        v = self.output_fields.get(name)
        return "" if v is None else str(v)


class SecurityEventMetrics:
    """The receiver's counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("shopfleet_controller_security_events_total",
                              "Security events (Falco, via FalcoSidekick) turned into alerts, by rule and priority.",
                              ["rule", "priority"], registry=registry)
        self.rejected = Counter("shopfleet_controller_security_events_rejected_total",
                                "Security event posts refused, by reason (too_large, not_json, invalid).",
                                ["reason"], registry=registry)


def rule_slug(rule: str) -> str:
    """Return the alert rule of a Falco rule: ``security:`` and the name in lower-case words, within 64 characters."""
    return (store.EVENT_RULE_PREFIX + _SLUG.sub("_", rule.lower()).strip("_"))[:64]


def resolve_shop(event: FalcoEvent, nodes: Callable[[], list[tuple[str, str]]]) -> tuple[str, str]:
    """Return (shop, how) for ``event``: its ``shopfleet.shop`` field, the one shop with a node named like its host, or ("", why not)."""
    known = nodes()
    claimed = event.field("shopfleet.shop")
    shops = {shop for shop, _ in known}
    if claimed:
        if claimed in shops:
            return claimed, "field"
        return "", f"the event names shop {claimed!r}, which the fleet does not know"
    host = event.hostname or event.field("hostname")
    if not host:
        return "", "the event has neither a shopfleet.shop field nor a hostname"
    owners = sorted({shop for shop, node in known if node == host})
    if len(owners) == 1:
        return owners[0], "hostname"
    if owners:
        return "", f"node {host!r} exists in several shops ({', '.join(owners)}): set CUSTOMFIELDS shopfleet.shop in Sidekick"
    return "", f"no shop has a node named {host!r}"


def to_firing(event: FalcoEvent, shop: str, why_unknown: str) -> Firing:
    """Return the alert ``event`` opens (or counts on): keyed by rule, shop, node, namespace/container."""
    rule = rule_slug(event.rule)
    node = (event.hostname or event.field("hostname"))[:63]
    ns, pod, container = event.field("k8s.ns.name"), event.field("k8s.pod.name"), event.field("container.name")
    source = "/".join(p for p in (ns, container) if p)[:128]  # not the pod: its name changes at every restart
    where = f"{shop}/{node}" if shop else (f"node {node} (shop unknown)" if node else "a node of an unknown shop")
    in_pod = f" in pod {ns}/{pod}" + (f" container {container}" if container else "") if pod else ""
    summary = f"{event.rule} on {where}{in_pod}"
    details = event.output if not why_unknown else f"{event.output}\n(shop unknown: {why_unknown})"
    return Firing(alert_key(rule, shop, node, source)[:255], rule, shop, node, source, PRIORITY_SEVERITY[event.priority],
                  summary, since=event.time.timestamp(), details=details, runbook=RUNBOOK)


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """Return the body, or None once it exceeds ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def security_events_router(host: ControllerHost, metrics: SecurityEventMetrics, *, clock: Callable[[], float] = time.time) -> APIRouter:
    """Return the router of ``POST /api/v1/security-events`` (the guard checks ``security:ingest``)."""
    r = APIRouter()

    def refuse(status: int, reason: str, message: str) -> JSONResponse:
        metrics.rejected.labels(reason).inc()
        log.warning("security event refused (%s): %s", reason, message)
        return JSONResponse({"detail": message}, status_code=status)

    def nodes() -> list[tuple[str, str]]:
        return [(n.shop, n.node) for n in host.reader.node_states()]

    @r.post("/api/v1/security-events", tags=["alerts"], status_code=202,
            summary="Receive one Falco event from FalcoSidekick's webhook output and raise it as an alert")
    async def receive(request: Request) -> JSONResponse:
        raw = await _read_capped(request, MAX_BODY_BYTES)
        if raw is None:
            return refuse(413, "too_large", f"body larger than {MAX_BODY_BYTES} bytes: post one Falco event per request")
        try:
            data: Any = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return refuse(400, "not_json", f"body is not JSON ({exc}): post FalcoSidekick's webhook JSON")
        if not isinstance(data, dict):
            return refuse(422, "invalid", f"body is a JSON {type(data).__name__}, not an object: post one Falco event")
        try:
            event = FalcoEvent.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
            return refuse(422, "invalid", f"not a Falco event: {problems}")
        shop, how = await run_in_threadpool(resolve_shop, event, nodes)
        firing = to_firing(event, shop, "" if shop else how)
        alert, opened = await run_in_threadpool(store.record_event, host.engine, firing, clock())
        metrics.events.labels(firing.rule, event.priority).inc()
        if opened:
            log.warning("security alert %s opened: %s", alert.key, alert.summary)
        host.bus.publish(BusEvent("alert_changed", alert.shop, alert.node or None, alert.as_dict()))
        return JSONResponse({"alert_id": alert.id, "key": alert.key, "opened": opened, "shop": shop, "count": int(alert.value or 0)},
                            status_code=202)

    return r


def install(host: ControllerHost) -> SecurityEventMetrics:
    """Add the receiver to a controller (call before ``start()``); return its metrics."""
    metrics = SecurityEventMetrics(host.metrics_registry)
    host.add_router(security_events_router(host, metrics))
    return metrics

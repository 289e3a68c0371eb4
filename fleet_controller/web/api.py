"""The REST API over the fleet registry (``/api/v1``): shops, nodes, events.

Read-only views for operators and tools, plus ``PUT /api/v1/shops/{shop}`` to register a shop's
name, region, labels and time zone (shops otherwise appear on their first message). Response
models are declared so ``/docs`` shows every field. The registry is taken from
``request.app.state.registry``, so the router is independent of how the app was assembled.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.protocol import ID_PATTERN
from fleet_controller.registry.store import NotFound, Registry

PRESENCE_PATTERN = "^(online|stale|offline|unknown)$"


class NodeSummary(BaseModel):
    """A node as listed in its shop."""

    shop: str
    node: str
    node_class: str
    arch: str
    agent_version: str
    release: str | None
    presence: str = Field(description="online, stale, offline or unknown.")
    presence_reason: str
    presence_changed_at: float | None
    session: int
    last_seen: float | None = Field(description="Unix seconds of the last message from the node.")
    first_seen: float
    heartbeat_interval_s: float | None
    epoch: str
    watermark: int = Field(description="Highest seq received in the current epoch.")
    open_gaps: int = Field(description="Seqs below the watermark not received (yet).")
    messages_total: int
    duplicates_total: int
    missing_total: int = Field(description="Seqs found missing since the node was first seen (filled ones included).")


class HeartbeatPoint(BaseModel):
    """One heartbeat in a node's recent history."""

    seq: int
    epoch: str
    ts: float
    received_at: float
    cpu_load_1m: float | None
    cpu_temp_c: float | None
    mem_available_bytes: int | None
    disk_free_bytes: int | None
    outbox_depth: int
    metrics: dict[str, float]


class NodeDetail(NodeSummary):
    """A node with its latest facts and recent heartbeats (newest first)."""

    facts: dict[str, Any] | None
    facts_at: float | None
    pipelines: dict[str, Any]
    metrics: dict[str, Any]
    gaps: list[list[int]] = Field(description="Open gaps as [first, last] seq ranges.")
    history: list[HeartbeatPoint]


class ShopSummary(BaseModel):
    """A shop in the list, with its node counts."""

    id: str
    name: str
    region: str
    labels: dict[str, str]
    timezone: str
    created_at: float
    nodes: int
    nodes_by_presence: dict[str, int]


class ShopPage(BaseModel):
    """One page of shops."""

    items: list[ShopSummary]
    total: int
    limit: int
    offset: int


class ReadingView(BaseModel):
    """Latest value of one reading of a node (shelf weight, fridge temperature...)."""

    node: str
    source: str
    name: str
    value: float
    unit: str
    labels: dict[str, str]
    ts: float
    received_at: float


class ReportedStateView(BaseModel):
    """The latest state the shop reported for its desired state."""

    node: str
    release: str | None
    revision: int
    status: str
    error: str
    objects: list[dict[str, Any]]
    ts: float
    received_at: float


class ShopDetail(BaseModel):
    """A shop with its nodes, latest readings and reported state."""

    id: str
    name: str
    region: str
    labels: dict[str, str]
    timezone: str
    created_at: float
    nodes: list[NodeSummary]
    readings: list[ReadingView]
    reported_state: ReportedStateView | None


class EventView(BaseModel):
    """A shop event, node alert or presence change."""

    id: int
    shop: str
    node: str
    kind: str = Field(description="event, alert or presence.")
    type: str = Field(description="Event type, alert name or new presence state.")
    state: str
    severity: str
    source: str
    message: str
    data: dict[str, Any]
    at: float
    received_at: float
    seq: int


class ShopRegistration(BaseModel):
    """Fields an operator sets on a shop; omitted ones stay as they are."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200, description="Display name.")
    region: str | None = Field(None, max_length=100, description="Region, for filtering and rollout waves.")
    labels: dict[str, str] | None = Field(None, description="Free labels, e.g. {'tier': 'pilot'}.")
    timezone: str | None = Field(None, max_length=64, description="IANA time zone, e.g. Europe/Berlin (maintenance windows).")


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _parse_labels(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key:
            raise HTTPException(422, f"label filter {v!r}: use key=value, e.g. label=tier=pilot")
        out[key] = val
    return out


def build_router() -> APIRouter:
    """Return the ``/api/v1`` router over the registry."""
    r = APIRouter(prefix="/api/v1", tags=["registry"])

    @r.get("/shops", response_model=ShopPage, summary="List shops")
    def list_shops(
        request: Request,
        region: str | None = Query(None, description="Only shops of this region."),
        label: list[str] = Query([], description="Only shops with this label, as key=value; repeat for several."),
        presence: str | None = Query(None, pattern=PRESENCE_PATTERN, description="Only shops with a node in this presence state."),
        q: str | None = Query(None, max_length=100, description="Substring of the shop id or name."),
        limit: int = Query(100, ge=1, le=1000, description="Page size."),
        offset: int = Query(0, ge=0, description="Shops to skip."),
    ) -> dict[str, Any]:
        items, total = _registry(request).list_shops(
            region=region, labels=_parse_labels(label), presence=presence, q=q, limit=limit, offset=offset
        )
        return {"items": items, "total": total, "limit": limit, "offset": offset}

    @r.get("/shops/{shop}", response_model=ShopDetail, summary="One shop with its nodes")
    def get_shop(request: Request, shop: str) -> dict[str, Any]:
        try:
            return _registry(request).get_shop(shop)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @r.put("/shops/{shop}", response_model=ShopSummary, summary="Register a shop or update its name, region, labels, time zone")
    def put_shop(request: Request, shop: str, body: ShopRegistration) -> dict[str, Any]:
        if not re.match(ID_PATTERN, shop):
            raise HTTPException(422, f"invalid shop id {shop!r}: use lowercase letters, digits and '-'")
        reg = _registry(request)
        reg.register_shop(shop, name=body.name, region=body.region, labels=body.labels, timezone=body.timezone)
        items, _ = reg.list_shops(q=shop, limit=1000)
        return next(i for i in items if i["id"] == shop)

    @r.get("/shops/{shop}/nodes/{node}", response_model=NodeDetail, summary="One node with facts and recent heartbeats")
    def get_node(
        request: Request, shop: str, node: str,
        history: int = Query(60, ge=0, le=1000, description="How many recent heartbeats to include."),
    ) -> dict[str, Any]:
        try:
            return _registry(request).get_node(shop, node, history=history)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @r.get("/shops/{shop}/events", response_model=list[EventView], summary="Events, alerts and presence changes of a shop")
    def shop_events(
        request: Request, shop: str,
        kind: str | None = Query(None, pattern="^(event|alert|presence)$", description="Only this kind."),
        after_id: int = Query(0, ge=0, description="Only events after this id, oldest first (for polling a feed)."),
        limit: int = Query(100, ge=1, le=1000, description="Most events to return."),
    ) -> list[dict[str, Any]]:
        reg = _registry(request)
        try:
            reg.get_shop(shop, with_nodes=False)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return reg.list_events(shop, kind=kind, after_id=after_id, limit=limit)

    return r

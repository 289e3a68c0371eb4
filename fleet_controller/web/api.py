"""The REST API over the fleet registry (``/api/v1``): shops, nodes, events.

Read-only views for operators and tools, plus ``PUT /api/v1/shops/{shop}`` to register a shop's
name, region, labels and time zone (shops otherwise appear on their first message). Response
models are the registry's read models (:mod:`fleet_controller.registry.read`), so ``/docs`` shows
every field and a node has one shape everywhere. The reader and the writer are taken from
``request.app.state``, so the router is independent of how the app was assembled; a shop
registration goes through the single registry writer like every other write.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from edge_agent.protocol import ID_PATTERN, Channel, Topics
from fleet_controller.host import ShopWriter
from fleet_controller.registry.audit import AuditLog
from fleet_controller.registry.read import (
    EventView,
    NodeDetail,
    NotFound,
    QuarantineView,
    RegistryReader,
    ShopDetail,
    ShopSummary,
)
from fleet_controller.registry.store import NodeNotRemovable
from fleet_controller.web.accounts.roles import Permission
from fleet_controller.web.accounts.web import require
from shopfleet.errors import TemporaryError

PRESENCE_PATTERN = "^(online|stale|offline|unknown)$"


class ShopPage(BaseModel):
    """One page of shops."""

    items: list[ShopSummary]
    total: int
    limit: int
    offset: int


class ShopRegistration(BaseModel):
    """Fields an operator sets on a shop; omitted ones stay as they are."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200, description="Display name.")
    region: str | None = Field(None, max_length=100, description="Region, for filtering and rollout waves.")
    labels: dict[str, str] | None = Field(None, description="Free labels, e.g. {'tier': 'pilot'}.")
    timezone: str | None = Field(None, max_length=64, description="IANA time zone, e.g. Europe/Berlin (maintenance windows).")
    applier: str | None = Field(None, pattern=ID_PATTERN, description="Node whose reported state decides the shop's rollouts (the node with apply.enabled).")


class NodeRemoval(BaseModel):
    """What ``DELETE /api/v1/shops/{shop}/nodes/{node}`` did."""

    shop: str
    node: str
    removed: bool = Field(description="The registry no longer holds the node.")
    revoked: dict[str, Any] | None = Field(
        description="Its credentials' revocation (as POST .../credentials/revoke answers), or null when this controller has no "
                    "enrollment configured: then remove its lines from the broker's password and ACL files yourself.")


class QuarantinePage(BaseModel):
    """One page of quarantined messages, newest first."""

    items: list[QuarantineView]
    total: int
    limit: int
    offset: int


def _reader(request: Request) -> RegistryReader:
    reader: RegistryReader = request.app.state.reader
    return reader


def _writer(request: Request) -> ShopWriter:
    writer: ShopWriter | None = request.app.state.writer
    if writer is None:
        raise HTTPException(503, "this app has no registry writer: shops can be registered through a running controller only")
    return writer


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
    ) -> ShopPage:
        items, total = _reader(request).list_shops(
            region=region, labels=_parse_labels(label), presence=presence, q=q, limit=limit, offset=offset
        )
        return ShopPage(items=items, total=total, limit=limit, offset=offset)

    @r.get("/shops/{shop}", response_model=ShopDetail, summary="One shop with its nodes")
    def get_shop(request: Request, shop: str) -> ShopDetail:
        try:
            return _reader(request).get_shop(shop)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @r.put("/shops/{shop}", response_model=ShopSummary, summary="Register a shop or update its name, region, labels, time zone")
    async def put_shop(request: Request, shop: str, body: ShopRegistration) -> ShopSummary:
        if not re.match(ID_PATTERN, shop):
            raise HTTPException(422, f"invalid shop id {shop!r}: use lowercase letters, digits and '-'")
        await _writer(request).register_shop(shop, name=body.name, region=body.region, labels=body.labels, timezone=body.timezone,
                                             applier=body.applier)
        await run_in_threadpool(AuditLog(_reader(request).engine).record_here, "shop.register", shop, body.model_dump(exclude_none=True), shop=shop)
        items, _ = await run_in_threadpool(_reader(request).list_shops, q=shop, limit=1000)
        return next(i for i in items if i.id == shop)

    @r.get("/shops/{shop}/nodes/{node}", response_model=NodeDetail, summary="One node with facts and recent heartbeats")
    def get_node(
        request: Request, shop: str, node: str,
        history: int = Query(60, ge=0, le=1000, description="How many recent heartbeats to include."),
    ) -> NodeDetail:
        try:
            return _reader(request).get_node(shop, node, history=history)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @r.delete("/shops/{shop}/nodes/{node}", response_model=NodeRemoval, tags=["registry"],
              summary="Remove a node retired on purpose: its credentials revoked, then its row (history stays)",
              responses={404: {"description": "The registry does not know the node."},
                         409: {"description": "The node is its shop's applier: declare another applier first."},
                         503: {"description": "No registry writer; revoking the node's credentials, clearing its retained "
                                               "presence or the registry failed (try again)."}})
    async def remove_node(request: Request, shop: str, node: str) -> NodeRemoval:
        """Remove a node that left the fleet for good (a Pi replaced, a shop closed).

        First its credentials are revoked, when this controller has enrollment configured
        (``POST /api/v1/nodes/{shop}/{node}/credentials/revoke``: certificates on the CRL, password
        and ACL lines removed, broker reloaded), so it cannot come back; then the registry forgets
        it: its row with presence, cursor and counters, latest readings and reported state, and its
        retained presence on the broker. Its history (heartbeats, events, series) stays until
        retention ages it out. Its alerts resolve as any cleared condition does (it is no longer
        there to be offline). Audited as ``node.remove``. A node whose credentials
        still work comes back, as a new node, with its next message.
        """
        writer = _writer(request)
        reader = _reader(request)
        # Checked before revoking, so a mistyped node or an applier is refused with nothing done.
        try:
            await run_in_threadpool(lambda: reader.get_node(shop, node, history=0))
            applier = (await run_in_threadpool(reader.shop, shop)).applier
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        if applier == node:
            raise HTTPException(409, f"node {shop}/{node} is the applier of shop {shop} (its reports decide the shop's rollouts): "
                                     f"declare another applier first (PUT /api/v1/shops/{shop} {{\"applier\": \"<node>\"}})")
        revoke = getattr(request.app.state, "revoke_node", None)
        revoked = None
        audit = AuditLog(reader.engine)
        if revoke is not None:
            try:
                revoked = await run_in_threadpool(revoke, shop, node)
            except Exception as exc:
                await run_in_threadpool(audit.record_here, "node.remove", f"{shop}/{node}", {}, shop=shop,
                                        outcome=f"revocation failed: {exc}"[:500])
                raise HTTPException(503, f"revoking the credentials of {shop}/{node} failed, so the node was kept (it could "
                                         f"come back): {exc}") from None
        # Its retained presence (birth or Will) goes too: the broker would deliver it again on the controller's next
        # subscription (a restart, a replica taking the shop over) and bring the node back.
        service = getattr(request.app.state, "service", None)
        if service is not None:
            try:
                await service.mqtt.publish(Topics.node(shop, node, Channel.PRESENCE), b"", retain=True, qos=1)
            except Exception as exc:
                raise HTTPException(503, f"could not clear the retained presence of {shop}/{node} on the broker, so the node "
                                         f"was kept (it would come back): {exc}; try again once the broker answers") from None
        try:
            event = await writer.remove_node(shop, node)
        except NodeNotRemovable as exc:
            raise HTTPException(404 if exc.reason == "not_found" else 409, str(exc)) from None
        except TemporaryError as exc:  # the database is down or locked, or the writer is being replaced
            raise HTTPException(503, f"the registry could not remove {shop}/{node} now ({exc}); its credentials are "
                                     f"{'revoked' if revoked else 'unchanged'}: try again") from None
        bus = getattr(request.app.state, "bus", None)
        if bus is not None:
            bus.publish(event)
        await run_in_threadpool(audit.record_here, "node.remove", f"{shop}/{node}", {"revoked": revoked}, shop=shop)
        return NodeRemoval(shop=shop, node=node, removed=True, revoked=revoked)

    @r.get("/shops/{shop}/events", response_model=list[EventView], summary="Events, alerts and presence changes of a shop")
    def shop_events(
        request: Request, shop: str,
        kind: str | None = Query(None, pattern="^(event|alert|presence)$", description="Only this kind."),
        after_id: int = Query(0, ge=0, description="Only events after this id, oldest first (for polling a feed)."),
        limit: int = Query(100, ge=1, le=1000, description="Most events to return."),
    ) -> list[EventView]:
        reader = _reader(request)
        try:
            reader.shop(shop)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        return reader.list_events(shop, kind=kind, after_id=after_id, limit=limit)

    # Quarantined payloads are raw node input (possibly hostile, possibly personal data from a
    # shop): operators and admins only, the roles that act on incidents (alerts:ack).
    @r.get("/quarantine", response_model=QuarantinePage, summary="Messages the intake quarantined (dead letters)",
           dependencies=[Depends(require(Permission.ALERTS_ACK))])
    def list_quarantine(
        request: Request,
        reason: str | None = Query(None, pattern="^[a-z_]{1,32}$", description="Only this reason: store, writer, unexpected."),
        shop: str | None = Query(None, pattern=ID_PATTERN, description="Only messages of this shop."),
        limit: int = Query(50, ge=1, le=500, description="Page size."),
        offset: int = Query(0, ge=0, description="Messages to skip."),
    ) -> QuarantinePage:
        items, total = _reader(request).list_quarantine(reason=reason, shop=shop, limit=limit, offset=offset)
        return QuarantinePage(items=items, total=total, limit=limit, offset=offset)

    return r

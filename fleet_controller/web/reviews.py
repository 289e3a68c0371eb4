"""The cart review queue on the web: ``/reviews`` pages and the ``/api/v1/carts`` API.

Reading carts needs ``carts:read`` and acting on them ``carts:review`` (the ``reviewer`` role has
both, ``admin`` everything): the guard around the whole app already refuses a write under
``/api/v1/carts`` without ``carts:review`` and checks the CSRF token of a browser session; every
route here also declares its permission, so a viewer can read the fleet but not receipts.

Actions (accept, fix a line, reassign) go to :class:`~fleet_controller.registry.carts.CartStore`,
which audits each with who (the logged-in user or token owner), when and from where (the client
address the server saw). The pages render on the server; ``/static/reviews.js`` sends the
actions as JSON with the session's CSRF token and reloads the page (no inline script).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fleet_controller.host import ControllerHost
from fleet_controller.registry.carts import (
    CartActionError,
    CartDetail,
    CartMetrics,
    CartNotFound,
    CartStore,
    CartSummary,
    ShopCartStats,
)
from fleet_controller.web.accounts.roles import Permission, has_permission
from fleet_controller.web.accounts.store import Principal
from fleet_controller.web.accounts.web import current_principal, require

TEMPLATES = Path(__file__).resolve().parent / "dashboard" / "templates"


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _money(cents: int | None) -> str:
    return "" if cents is None else f"{cents / 100:.2f}"


_templates = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
_templates.filters.update(iso=_iso, money=_money)


class FixBody(BaseModel):
    """Fix one line: a new product, a new quantity (0 removes it), or move it to another cart."""

    model_config = ConfigDict(extra="forbid")
    product: str = Field(min_length=1, max_length=128, description="The line to fix (its current product).")
    new_product: str | None = Field(None, min_length=1, max_length=128, description="The product it really is.")
    quantity: int | None = Field(None, ge=0, le=10_000, description="The real number of units (0 removes the line).")
    to_cart: str | None = Field(None, min_length=1, max_length=128, description="Move the line to this cart (same shop).")
    unit_price_cents: int | None = Field(None, ge=0, description="Price of new_product when the shop's carts never had it.")
    comment: str = Field("", max_length=500, description="Why, for the audit trail.")


class ReassignBody(BaseModel):
    """The shopper session the whole cart belongs to."""

    model_config = ConfigDict(extra="forbid")
    shopper: str = Field(min_length=1, max_length=128, description="Session (or shopper) id the cart really belongs to.")
    comment: str = Field("", max_length=500, description="Why, for the audit trail.")


class AcceptBody(BaseModel):
    """Accept the cart as it now stands."""

    model_config = ConfigDict(extra="forbid")
    comment: str = Field("", max_length=500, description="Anything the next reviewer should know.")


def _remote(request: Request) -> str:
    """Return where the request came from, as the server saw it (no trust in forwarded headers)."""
    return request.client.host if request.client else ""


def reviews_router(store: CartStore, *, clock: Callable[[], float] = time.time) -> APIRouter:
    """Return the router of the review pages and the carts API on ``store``."""
    router = APIRouter()
    read = Depends(require(Permission.CARTS_READ))
    review = require(Permission.CARTS_REVIEW)

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        p: Principal | None = current_principal(request)
        html = _templates.get_template(name).render(
            user=p, csrf=(p.csrf_token if p else "") or "", now=clock(), path=request.url.path,
            can_review=p is not None and has_permission(p.role, Permission.CARTS_REVIEW), **ctx,
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    async def act(fn: Callable[..., CartDetail], *args: Any, **kwargs: Any) -> CartDetail:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except CartNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except CartActionError as exc:
            raise HTTPException(409, str(exc)) from None

    @router.get("/reviews", include_in_schema=False, dependencies=[read])
    async def queue_page(request: Request, shop: str | None = None, status: str = "review") -> HTMLResponse:
        if status not in ("review", "reviewed", "accepted", "all"):
            status = "review"
        carts = await run_in_threadpool(store.list_carts, shop or None, None if status == "all" else status, 200)  # type: ignore[arg-type]
        stats = await run_in_threadpool(store.stats)
        return page(request, "reviews.html", carts=carts, stats=stats, shop=shop or "", showing=status)

    @router.get("/reviews/{cart_id}", include_in_schema=False, dependencies=[read])
    async def cart_page(request: Request, cart_id: str) -> HTMLResponse:
        try:
            cart = await run_in_threadpool(store.get, cart_id)
        except CartNotFound as exc:
            return page(request, "error.html", 404, title="No such cart", message=str(exc))
        others = await run_in_threadpool(store.list_carts, cart.shop, None, 50)
        return page(request, "review.html", cart=cart, others=[c for c in others if c.cart_id != cart.cart_id])

    @router.get("/api/v1/carts", tags=["carts"], summary="Carts: the review queue by default", dependencies=[read])
    async def list_carts(shop: str | None = None, status: str = "review", limit: int = 200) -> list[CartSummary]:
        if status not in ("review", "reviewed", "accepted", "all"):
            raise HTTPException(422, "status must be review, reviewed, accepted or all")
        return await run_in_threadpool(store.list_carts, shop, None if status == "all" else status, limit)  # type: ignore[arg-type]

    @router.get("/api/v1/carts/stats", tags=["carts"], summary="Per-shop cart counts and review accuracy", dependencies=[read])
    async def cart_stats() -> list[dict[str, Any]]:
        rows: list[ShopCartStats] = await run_in_threadpool(store.stats)
        return [{**s.model_dump(), "accuracy": s.accuracy} for s in rows]

    @router.get("/api/v1/carts/{cart_id}", tags=["carts"], summary="One cart with its evidence and audit trail", dependencies=[read])
    async def get_cart(cart_id: str) -> CartDetail:
        try:
            return await run_in_threadpool(store.get, cart_id)
        except CartNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @router.post("/api/v1/carts/{cart_id}/fix", tags=["carts"], summary="Fix one line of a cart in review")
    async def fix(cart_id: str, body: FixBody, request: Request, p: Principal = Depends(review)) -> CartDetail:
        return await act(store.fix_line, cart_id, body.product, actor=p.username, remote=_remote(request),
                         new_product=body.new_product, quantity=body.quantity, to_cart=body.to_cart,
                         unit_price_cents=body.unit_price_cents, comment=body.comment)

    @router.post("/api/v1/carts/{cart_id}/reassign", tags=["carts"], summary="Give a cart in review to another shopper")
    async def reassign(cart_id: str, body: ReassignBody, request: Request, p: Principal = Depends(review)) -> CartDetail:
        return await act(store.reassign, cart_id, body.shopper, actor=p.username, remote=_remote(request), comment=body.comment)

    @router.post("/api/v1/carts/{cart_id}/accept", tags=["carts"], summary="Accept a cart in review: it becomes the receipt")
    async def accept(cart_id: str, body: AcceptBody, request: Request, p: Principal = Depends(review)) -> CartDetail:
        return await act(store.accept, cart_id, actor=p.username, remote=_remote(request), comment=body.comment)

    return router


def install(host: ControllerHost) -> CartStore:
    """Add the review pages, the carts API and the cart metrics to a controller service (before start)."""
    store = CartStore(host.engine)
    host.add_router(reviews_router(store))
    host.metrics_registry.register(CartMetrics(store))
    return store

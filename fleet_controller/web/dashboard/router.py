"""HTTP routes of the dashboard: the pages, their JSON API, alert actions and the live stream.

Pages render on the server from the same functions as the JSON API (``/api/v1/fleet``,
``/api/v1/alerts``), so the browser script can refresh a table with the exact data a reload
would show. Authentication and the role check come from the guard around the whole app
(``fleet_controller.web.accounts.web``); the alert actions also declare their permission here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fleet_controller.alerts import store as alert_store
from fleet_controller.alerts.rules import AlertRules
from fleet_controller.registry.audit import AuditLog
from fleet_controller.registry.read import NotFound, RegistryReader
from fleet_controller.web.accounts.roles import Permission, has_permission
from fleet_controller.web.accounts.store import Principal
from fleet_controller.web.accounts.web import current_principal, require
from fleet_controller.web.dashboard.fleetview import FleetQuery, SummaryCache
from fleet_controller.web.dashboard.live import LiveHub
from fleet_controller.web.dashboard.shopview import shape_shop

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
STATIC_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}
"""Served under /static/ (open without login: the login page needs the stylesheet). A fixed list,
so no path from a URL ever reaches the file system."""


def _ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, (now or time.time()) - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def _bytes(v: float | None) -> str:
    # Anything but a number (None, a fact a node never sent: Jinja's Undefined) shows as a dash, never a 500.
    if not isinstance(v, int | float):
        return "\u2013"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


def _num(v: float | None, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else "\u2013"


def _iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
templates.filters.update(ago=_ago, bytes=_bytes, num=_num, iso=_iso)


def query_string(query: FleetQuery, **overrides: Any) -> str:
    """Return the query string of ``query`` with ``overrides``, leaving out defaults (for links)."""
    defaults = FleetQuery().model_dump()
    merged = {**query.model_dump(), **overrides}
    return urlencode({k: ("true" if v is True else v) for k, v in merged.items() if v not in ("", None, False) and v != defaults.get(k)})


def parse_fleet_query(params: dict[str, str]) -> FleetQuery:
    """Return the fleet query of a query string (empty values mean 'not set'); raise ``ValidationError``."""
    return FleetQuery.model_validate({k: v for k, v in params.items() if v != ""})


class SilenceBody(BaseModel):
    """How long to silence an alert."""

    model_config = ConfigDict(extra="forbid")
    duration_s: float = Field(3600, gt=0, le=30 * 86400, description="Seconds to mute the alert's key (max 30 days).")
    comment: str = Field("", max_length=500, description="Why, for the next operator.")


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def route_paths(app: Any) -> list[str]:
    """Return the path of every route of ``app``, including those of included routers."""
    paths: list[str] = []
    for r in app.routes:
        if hasattr(r, "effective_route_contexts"):  # FastAPI >= 0.16x keeps included routers lazily
            paths.extend(c.path for c in r.effective_route_contexts())
        elif getattr(r, "path", None):
            paths.append(r.path)
    return paths


CHANGES_STATE = frozenset({"presence", "node_added", "node_removed", "shop_added", "reported_state", "alert_changed", "alert"})
"""Live topics after which the fleet table's cached shop summaries are re-read."""


def dashboard_router(reader: RegistryReader, hub: LiveHub, rules: AlertRules, *, clock: Callable[[], float] = time.time,
                     summary_max_age_s: float = 2.0) -> APIRouter:
    """Return the dashboard's router (pages, fleet and alert API, live stream, static files).

    ``summary_max_age_s`` bounds how old the fleet table's ``last seen`` and occupancy may be
    (see :class:`~fleet_controller.web.dashboard.fleetview.SummaryCache`).
    """
    router = APIRouter()
    engine = reader.engine
    summaries = SummaryCache(reader, summary_max_age_s, rules=rules)

    def on_live(topic: str, _data: dict[str, Any]) -> None:
        if topic in CHANGES_STATE:
            summaries.invalidate()

    hub.listen(on_live)

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        p: Principal | None = current_principal(request)
        html = templates.get_template(name).render(
            user=p, csrf=(p.csrf_token if p else "") or "", now=clock(), path=request.url.path,
            can_ack=p is not None and has_permission(p.role, Permission.ALERTS_ACK),
            can_silence=p is not None and has_permission(p.role, Permission.ALERTS_SILENCE),
            can_rollout=p is not None and has_permission(p.role, Permission.ROLLOUTS),
            **ctx,
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/fleet", status_code=303)

    @router.get("/fleet", include_in_schema=False)
    async def fleet(request: Request) -> HTMLResponse:
        try:
            query = parse_fleet_query(dict(request.query_params))
        except ValidationError as exc:
            return page(request, "error.html", 400, title="Bad filter",
                        message=f"{_errors(exc)}. Clear the filters and try again.")
        data = await run_in_threadpool(summaries.page, query)
        return page(request, "fleet.html", fleet=data, query=query,
                    qs=lambda **kw: query_string(query, **kw))

    @router.get("/shops/{shop}", include_in_schema=False)
    async def shop(request: Request, shop: str) -> HTMLResponse:
        def load() -> dict[str, Any]:
            s = reader.get_shop(shop)
            nodes = [reader.get_node(shop, n.node, history=60) for n in s.nodes]
            ctx = shape_shop(s, nodes, rules, clock())
            ctx["events"] = [e.model_dump() for e in reader.list_events(shop, limit=50)]
            ctx["alerts"] = alert_store.list_alerts(engine, clock(), shop=shop)
            return ctx

        try:
            ctx = await run_in_threadpool(load)
        except NotFound:
            return page(request, "error.html", 404, title="No such shop",
                        message=f"The registry does not know shop {shop!r}. Pick one on the fleet page.")
        return page(request, "shop.html", **ctx)

    @router.get("/alerts", include_in_schema=False)
    async def alerts(request: Request) -> HTMLResponse:
        now = clock()
        firing = await run_in_threadpool(alert_store.list_alerts, engine, now, state="firing")
        resolved = await run_in_threadpool(alert_store.list_alerts, engine, now, state="resolved", limit=50)
        return page(request, "alerts.html", firing=firing, resolved=resolved)

    @router.get("/rollouts", include_in_schema=False)
    async def rollouts(request: Request) -> HTMLResponse:
        installed = any(p.startswith("/api/v1/rollouts") for p in route_paths(request.app))
        return page(request, "rollouts.html", rollouts_api=installed)

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = STATIC_FILES.get(name)
        if path is None:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=300"})

    @router.get("/api/v1/fleet", tags=["dashboard"], summary="One page of the fleet table")
    async def fleet_api(request: Request) -> dict[str, Any]:
        try:
            query = parse_fleet_query(dict(request.query_params))
        except ValidationError as exc:
            raise HTTPException(422, f"bad query: {_errors(exc)}") from None
        return (await run_in_threadpool(summaries.page, query)).as_dict()

    @router.get("/api/v1/alerts", tags=["alerts"], summary="Alerts, firing or resolved")
    async def list_alerts(state: str = "firing", shop: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        if state not in ("firing", "resolved"):
            raise HTTPException(422, "state must be 'firing' or 'resolved'")
        rows = await run_in_threadpool(alert_store.list_alerts, engine, clock(), state=state, shop=shop, limit=min(limit, 5000))
        return [a.as_dict() for a in rows]

    @router.post("/api/v1/alerts/{alert_id}/ack", tags=["alerts"], summary="Acknowledge an alert")
    async def ack(alert_id: int, p: Principal = Depends(require(Permission.ALERTS_ACK))) -> dict[str, Any]:
        try:
            a = await run_in_threadpool(alert_store.acknowledge, engine, alert_id, p.username, clock())
        except alert_store.AlertNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        hub.publish("alert_changed", a.as_dict())
        await run_in_threadpool(AuditLog(engine).record_here, "alert.ack", f"alert {alert_id}", {"rule": a.rule, "key": a.key}, shop=a.shop)
        return a.as_dict()

    @router.post("/api/v1/alerts/{alert_id}/silence", tags=["alerts"], summary="Silence an alert for a while")
    async def silence(alert_id: int, body: SilenceBody, p: Principal = Depends(require(Permission.ALERTS_SILENCE))) -> dict[str, Any]:
        try:
            a = await run_in_threadpool(alert_store.silence, engine, alert_id, p.username, body.duration_s, clock(), body.comment)
        except alert_store.AlertNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        hub.publish("alert_changed", a.as_dict())
        await run_in_threadpool(AuditLog(engine).record_here, "alert.silence", f"alert {alert_id}",
                                {"rule": a.rule, "key": a.key, "duration_s": body.duration_s, "comment": body.comment}, shop=a.shop)
        return a.as_dict()

    @router.get("/api/v1/live", tags=["dashboard"], summary="Server-sent events: presence, events, alerts")
    async def live() -> StreamingResponse:
        return StreamingResponse(hub.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return router

"""Silences, alert history and notification channels: JSON API and dashboard pages.

* ``/alerts/silences`` and ``/api/v1/silences``: silences with a chosen duration, a comment and
  their author; active and recent ones; undo (``POST /api/v1/silences/{id}/expire``).
* ``/alerts/history`` and ``/api/v1/alerts/history``: every alert active in a time range, with its
  node, duration, flap count and who acknowledged it, filtered by shop, rule and time.
* ``/alerts/channels`` and ``/api/v1/alert-channels``: webhook, email (SMTP) and chat channels,
  admins only (``fleet:admin``); secrets are shown masked; "send test" delivers a test message.

The guard around the app authenticates every request and checks CSRF; writes below
``/api/v1/silences`` need ``alerts:silence`` and unknown prefixes (the channels) need
``fleet:admin`` (``fleet_controller.web.accounts.roles``), and each route also states its
permission. Changes are announced on the controller's bus (``alert_changed``), which the
dashboard forwards to open pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from fleet_controller.alerts import channels as ch
from fleet_controller.alerts import store
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.host import ControllerHost
from fleet_controller.registry.bus import BusEvent
from fleet_controller.web.accounts.roles import Permission, has_permission
from fleet_controller.web.accounts.store import Principal
from fleet_controller.web.accounts.web import current_principal, require
from fleet_controller.web.dashboard.router import templates

DURATIONS = ((15 * 60, "15 min"), (3600, "1 h"), (4 * 3600, "4 h"), (8 * 3600, "8 h"), (86400, "1 day"), (7 * 86400, "7 days"))
"""Durations the silence form offers (the API takes any number of seconds up to 30 days)."""


class NewSilence(BaseModel):
    """A silence on one alert (``alert_id``) or on an alert key (``key``: rule/shop/node/source)."""

    model_config = ConfigDict(extra="forbid")
    alert_id: int | None = Field(None, description="Silence the key of this alert.")
    key: str | None = Field(None, max_length=255, description="Or an alert key, rule/shop/node/source.")
    duration_s: float = Field(gt=0, le=30 * 86400, description="Seconds to mute (max 30 days).")
    comment: str = Field("", max_length=500, description="Why, for the next operator.")

    @model_validator(mode="after")
    def _target(self) -> NewSilence:
        if (self.alert_id is None) == (self.key is None):
            raise ValueError("give exactly one of alert_id or key")
        return self


def _duration(s: float | None) -> str:
    if s is None:
        return "\u2013"
    s = max(0.0, s)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _parse_time(value: str | None, name: str) -> float | None:
    """Return epoch seconds of an ISO date/time (UTC unless it says otherwise) or epoch number; 422 otherwise."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(422, f"{name}={value!r}: use an ISO time like 2026-11-29T08:00 or epoch seconds") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def alerts_router(host: ControllerHost, metrics: AlertMetrics, *, dashboard_url: str = "",
                  clock: Callable[[], float] = time.time) -> APIRouter:
    """Return the router of silences, history and channels over the host's database and bus."""
    engine = host.engine
    r = APIRouter()
    templates.filters.setdefault("duration", _duration)

    def announce(a: store.AlertView) -> None:
        host.bus.publish(BusEvent("alert_changed", a.shop, a.node or None, a.as_dict()))

    def page(request: Request, name: str, **ctx: Any) -> HTMLResponse:
        p: Principal | None = current_principal(request)
        html = templates.get_template(name).render(
            user=p, csrf=(p.csrf_token if p else "") or "", now=clock(), path=request.url.path,
            can_silence=p is not None and has_permission(p.role, Permission.ALERTS_SILENCE),
            can_admin=p is not None and has_permission(p.role, Permission.FLEET_ADMIN),
            **ctx,
        )
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    # ----- silences -------------------------------------------------------------------------------

    @r.get("/api/v1/silences", tags=["alerts"], summary="Active silences and those that ended recently")
    async def list_silences(recent_s: float = Query(7 * 86400, ge=0, le=90 * 86400, description="How far back ended ones go.")
                            ) -> list[dict[str, Any]]:
        return [s.as_dict() for s in await run_in_threadpool(store.list_silences, engine, clock(), recent_s=recent_s)]

    @r.post("/api/v1/silences", tags=["alerts"], summary="Silence an alert or a key for a chosen time, with a comment")
    async def create_silence(body: NewSilence, p: Principal = Depends(require(Permission.ALERTS_SILENCE))) -> dict[str, Any]:
        now = clock()
        if body.alert_id is not None:
            try:
                a = await run_in_threadpool(store.silence, engine, body.alert_id, p.username, body.duration_s, now, body.comment)
            except store.AlertNotFound as exc:
                raise HTTPException(404, f"{exc}: pick one from GET /api/v1/alerts") from None
            announce(a)
            key = a.key
        else:
            key = body.key or ""
            if key.count("/") < 3:
                raise HTTPException(422, f"key {key!r}: use rule/shop/node/source (node and source may be empty: disk_low/shop-a/pi-1/)")
            await run_in_threadpool(store.silence_key, engine, key, p.username, body.duration_s, now, body.comment)
        silences = await run_in_threadpool(store.list_silences, engine, now, recent_s=0)
        return next(s.as_dict() for s in silences if s.key == key)

    @r.post("/api/v1/silences/{silence_id}/expire", tags=["alerts"], summary="End a silence now (undo)")
    async def expire_silence(silence_id: int, p: Principal = Depends(require(Permission.ALERTS_SILENCE))) -> dict[str, Any]:
        now = clock()
        try:
            s = await run_in_threadpool(store.expire_silence, engine, silence_id, p.username, now)
        except store.AlertNotFound as exc:
            raise HTTPException(404, f"{exc}: list them at GET /api/v1/silences") from None
        for a in await run_in_threadpool(store.list_alerts, engine, now, state="firing", shop=s.shop):
            if a.key == s.key:
                announce(a)
        return s.as_dict()

    @r.get("/alerts/silences", include_in_schema=False)
    async def silences_page(request: Request) -> HTMLResponse:
        now = clock()
        silences = await run_in_threadpool(store.list_silences, engine, now)
        firing = await run_in_threadpool(store.list_alerts, engine, now, state="firing")
        return page(request, "alerts_silences.html", silences=silences, firing=firing, durations=DURATIONS)

    # ----- history ----------------------------------------------------------------------------------

    def _history(shop: str | None, rule: str | None, start: str | None, end: str | None, limit: int) -> list[store.AlertView]:
        return store.history(engine, clock(), shop=shop or None, rule=rule or None, start=_parse_time(start, "start"),
                             end=_parse_time(end, "end"), limit=limit)

    @r.get("/api/v1/alerts/history", tags=["alerts"], summary="Alerts active in a time range, with durations and acknowledgers")
    async def history_api(
        shop: str | None = Query(None, description="Only this shop."),
        rule: str | None = Query(None, description="Only this rule (node:* for every node-raised alert)."),
        start: str | None = Query(None, description="From (ISO time, UTC unless given, or epoch seconds)."),
        end: str | None = Query(None, description="Until (ISO time or epoch seconds)."),
        limit: int = Query(500, ge=1, le=5000),
    ) -> list[dict[str, Any]]:
        now = clock()
        return [a.as_dict(now) for a in await run_in_threadpool(_history, shop, rule, start, end, limit)]

    @r.get("/alerts/history", include_in_schema=False)
    async def history_page(request: Request, shop: str = "", rule: str = "", start: str = "", end: str = "") -> HTMLResponse:
        try:
            rows = await run_in_threadpool(_history, shop, rule, start, end, 500)
            error = ""
        except HTTPException as exc:
            rows, error = [], str(exc.detail)
        rules = await run_in_threadpool(store.rules_seen, engine)
        shops = sorted({a.shop for a in rows} | ({shop} if shop else set()))
        return page(request, "alerts_history.html", rows=rows, rules=rules, shops=shops, error=error,
                    f={"shop": shop, "rule": rule, "start": start, "end": end})

    # ----- channels ---------------------------------------------------------------------------------

    admin = Depends(require(Permission.FLEET_ADMIN))

    def _channel_error(exc: ch.ChannelError) -> HTTPException:
        return HTTPException(404 if exc.reason == "not_found" else 409 if exc.reason == "duplicate" else 422, str(exc))

    @r.get("/api/v1/alert-channels", tags=["alerts"], summary="Notification channels (secrets masked)")
    async def list_channels(_: Principal = admin) -> list[dict[str, Any]]:
        return [c.as_dict() for c in await run_in_threadpool(ch.list_channels, engine)]

    async def _save(request: Request, p: Principal, channel_id: int | None) -> dict[str, Any]:
        try:
            spec = ch.ChannelSpec.model_validate(await request.json())
        except ValidationError as exc:
            raise HTTPException(422, "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())) from None
        except ValueError:
            raise HTTPException(422, "the body must be a JSON object (see the ChannelSpec schema in docs/alerts.md)") from None
        try:
            c = await run_in_threadpool(ch.save_channel, engine, spec, p.username, clock(), channel_id)
        except ch.ChannelError as exc:
            raise _channel_error(exc) from None
        return c.as_dict()

    @r.post("/api/v1/alert-channels", tags=["alerts"], summary="Add a notification channel (admins)")
    async def create_channel(request: Request, p: Principal = admin) -> dict[str, Any]:
        return await _save(request, p, None)

    @r.put("/api/v1/alert-channels/{channel_id}", tags=["alerts"], summary="Replace a channel; secrets left out or masked stay")
    async def update_channel(channel_id: int, request: Request, p: Principal = admin) -> dict[str, Any]:
        return await _save(request, p, channel_id)

    @r.delete("/api/v1/alert-channels/{channel_id}", tags=["alerts"], summary="Delete a channel")
    async def delete_channel(channel_id: int, _: Principal = admin) -> dict[str, Any]:
        try:
            await run_in_threadpool(ch.delete_channel, engine, channel_id)
        except ch.ChannelError as exc:
            raise _channel_error(exc) from None
        return {"deleted": channel_id}

    @r.post("/api/v1/alert-channels/{channel_id}/test", tags=["alerts"], summary="Send a test message through a channel")
    async def test_channel(channel_id: int, p: Principal = admin) -> dict[str, Any]:
        try:
            c = await run_in_threadpool(ch.get_channel, engine, channel_id)
        except ch.ChannelError as exc:
            raise _channel_error(exc) from None
        async with httpx.AsyncClient() as client:
            error = await ch.deliver(client, engine, c, ch.sample_alert(c, p.username, clock()), metrics.notifications,
                                     dashboard_url=dashboard_url, base_delay_s=0.2, clock=clock)
        return {"ok": not error, "error": error}

    @r.get("/alerts/channels", include_in_schema=False)
    async def channels_page(request: Request) -> HTMLResponse:
        p = current_principal(request)
        if p is None or not has_permission(p.role, Permission.FLEET_ADMIN):
            raise HTTPException(403, "notification channels are managed by admins")
        rows = await run_in_threadpool(ch.list_channels, engine)
        return page(request, "alerts_channels.html", channels=[c.as_dict() for c in rows])

    return r


def attach(host: ControllerHost, metrics: AlertMetrics, *, dashboard_url: str = "") -> None:
    """Add the silences, history and channels router to a controller (call before ``start()``)."""
    host.add_router(alerts_router(host, metrics, dashboard_url=dashboard_url))

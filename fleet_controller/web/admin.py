"""Admin pages and API: users, roles, API tokens, and the audit log.

The same actions as ``shopfleet users`` / ``shopfleet tokens``, for admins in the browser
(``/admin/users``, ``/admin/tokens``) and over the API (``/api/v1/users``, ``/api/v1/tokens``),
plus the read-only audit log (``/admin/audit``, ``/api/v1/audit``, ``/api/v1/audit.csv``) for
admins and auditors.

Why it looks like this:

* **Guarded twice.** The guard on the whole app already refuses a write below ``/admin`` or
  ``/api/v1/users|tokens`` without ``users:admin`` and checks CSRF on every form (the
  ``csrf_token`` field) and every API call from a session (the ``X-CSRF-Token`` header); each
  route here also declares its permission, so even reading the user list needs it.
* **Secrets shown once.** A generated password or a new token is rendered in the response to the
  POST that made it (``Cache-Control: no-store``), never stored in clear, never put in a URL or a
  redirect; a reload does not show it again.
* **No inline script.** Pages use plain forms; the confirmation dialogs come from
  ``/static/admin.js`` (``data-confirm`` attributes), so a Content-Security-Policy without
  ``'unsafe-inline'`` holds.
* **Every change is audited** (:mod:`fleet_controller.registry.audit`), with the acting admin
  and their address filled in by the guard.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fleet_controller.registry.audit import AuditLog, AuditQuery, csv_lines
from fleet_controller.web.accounts.roles import ROLE_PERMISSIONS, Permission, Role, has_permission
from fleet_controller.web.accounts.store import (
    AccountError,
    AccountStore,
    Principal,
    generate_password,
)
from fleet_controller.web.accounts.web import current_principal, require
from fleet_controller.web.dashboard.router import templates

MAX_FORM_BYTES = 65536
AUDIT_PAGE_ROWS = 200
AUDIT_CSV_MAX_ROWS = 100_000
"""Most rows one CSV export holds; narrow the time range for more (the export says so in its last line)."""


# ----- request bodies -------------------------------------------------------------------------


class NewUser(BaseModel):
    """Body of ``POST /api/v1/users``."""

    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64, description="Login name: letters, digits, '-', '_', '.', '@'.")
    role: Role = Field(description="What the user may do.")
    password: str | None = Field(None, min_length=10, max_length=1024,
                                 description="Initial password; omitted: a one-time password is generated and returned once.")


class UserChange(BaseModel):
    """Body of ``PATCH /api/v1/users/{name}``; omitted fields stay as they are."""

    model_config = ConfigDict(extra="forbid")
    role: Role | None = Field(None, description="The new role (the last admin cannot be demoted).")
    disabled: bool | None = Field(None, description="true: no login, sessions ended, tokens stop working; false: enabled again.")


class NewToken(BaseModel):
    """Body of ``POST /api/v1/tokens``."""

    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=64, description="User the token acts as (with that user's role).")
    name: str = Field(min_length=1, max_length=64, description="What the token is for, e.g. 'ci'.")


# ----- helpers -------------------------------------------------------------------------------


def _user_dict(u: Any) -> dict[str, Any]:
    return {"username": u.username, "role": u.role.value, "created_at": u.created_at,
            "must_change_password": u.must_change_password, "disabled": u.disabled_at is not None,
            "disabled_at": u.disabled_at}


def _token_dict(t: Any) -> dict[str, Any]:
    return {"prefix": t.prefix, "name": t.name, "user": t.username, "created_at": t.created_at,
            "last_used_at": t.last_used_at, "revoked_at": t.revoked_at, "active": t.revoked_at is None}


def parse_time(value: str | None, what: str) -> float | None:
    """Return Unix seconds of ``value``: Unix seconds, or ISO 8601 (a time without zone is UTC); raise 422 naming the fix."""
    if value is None or value.strip() == "":
        return None
    v = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", v):
        return float(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(422, f"{what}={value!r}: use ISO 8601 such as 2026-11-29T14:00 (UTC) or Unix seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def audit_query(actor: str, action: str, shop: str, since: str | None, until: str | None, limit: int,
                before_id: int | None = None) -> AuditQuery:
    """Return the audit query of the page's and the API's parameters."""
    return AuditQuery(actor=actor.strip(), action=action.strip(), shop=shop.strip(), since=parse_time(since, "since"),
                      until=parse_time(until, "until"), limit=limit, before_id=before_id)


async def form_fields(request: Request) -> dict[str, str]:
    """Return the fields of a urlencoded form post (the guard already checked its CSRF token)."""
    body = (await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def admin_router(store: AccountStore, *, clock: Callable[[], float] = time.time) -> APIRouter:
    """Return the router of the admin pages, the users/tokens API and the audit log."""
    router = APIRouter()
    audit = AuditLog(store.engine, clock)
    users_admin = Depends(require(Permission.USERS))
    auditor = Depends(require(Permission.AUDIT))

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        p: Principal | None = current_principal(request)
        html = templates.get_template(name).render(
            user=p, csrf=(p.csrf_token if p else "") or "", now=clock(), path=request.url.path,
            can_ack=False, can_silence=False, can_rollout=False,
            can_admin=p is not None and has_permission(p.role, Permission.USERS),
            can_audit=p is not None and has_permission(p.role, Permission.AUDIT),
            **ctx,
        )
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    # ----- users: pages -------------------------------------------------------------------------

    def users_page(request: Request, status: int = 200, *, error: str = "", notice: str = "",
                   secret: tuple[str, str] | None = None) -> HTMLResponse:
        users = store.list_users()
        roles = [(r.value, sorted(p.value for p in ROLE_PERMISSIONS[r])) for r in Role]
        return page(request, "admin_users.html", status, users=users, roles=roles, error=error, notice=notice, secret=secret)

    @router.get("/admin", include_in_schema=False)
    async def admin_home(request: Request) -> RedirectResponse:
        p = current_principal(request)
        target = "/admin/users" if p is not None and has_permission(p.role, Permission.USERS) else "/admin/audit"
        return RedirectResponse(target, status_code=303)

    @router.get("/admin/users", include_in_schema=False, dependencies=[users_admin])
    async def get_users(request: Request, done: str = "") -> HTMLResponse:
        return await run_in_threadpool(users_page, request, notice=done[:200])

    @router.post("/admin/users", include_in_schema=False, dependencies=[users_admin])
    async def post_user(request: Request) -> HTMLResponse:
        form = await form_fields(request)
        name, role = form.get("username", "").strip(), form.get("role", "")

        def create() -> HTMLResponse:
            password = generate_password()
            try:
                store.add_user(name, password, role, must_change_password=True)
            except (AccountError, ValueError) as exc:
                return users_page(request, 400, error=str(exc))
            audit.record_here("user.create", name, {"role": role})
            return users_page(request, 201, notice=f"Created {name} ({role}).", secret=(f"One-time password for {name}", password))

        return await run_in_threadpool(create)

    def user_form_action(fn: Callable[[str, dict[str, str]], str]) -> Callable[..., Any]:
        async def handler(request: Request, name: str) -> Response:
            form = await form_fields(request)
            try:
                notice = await run_in_threadpool(fn, name, form)
            except (AccountError, ValueError) as exc:
                msg = str(exc)
                return await run_in_threadpool(lambda: users_page(request, 400, error=msg))
            return RedirectResponse("/admin/users?" + urlencode({"done": notice}), status_code=303)

        return handler

    def set_role(name: str, form: dict[str, str]) -> str:
        role = form.get("role", "")
        store.set_role(name, role)
        audit.record_here("user.role", name, {"role": role})
        return f"{name} is now {role}."

    def disable(name: str, _form: dict[str, str]) -> str:
        store.set_disabled(name, True)
        audit.record_here("user.disable", name)
        return f"{name} is disabled."

    def enable(name: str, _form: dict[str, str]) -> str:
        store.set_disabled(name, False)
        audit.record_here("user.enable", name)
        return f"{name} is enabled."

    router.add_api_route("/admin/users/{name}/role", user_form_action(set_role), methods=["POST"], include_in_schema=False,
                         dependencies=[users_admin])
    router.add_api_route("/admin/users/{name}/disable", user_form_action(disable), methods=["POST"], include_in_schema=False,
                         dependencies=[users_admin])
    router.add_api_route("/admin/users/{name}/enable", user_form_action(enable), methods=["POST"], include_in_schema=False,
                         dependencies=[users_admin])

    def reset_password(name: str) -> str:
        password = generate_password()
        store.set_password(name, password)  # ends the user's sessions
        store.require_password_change(name)
        audit.record_here("user.reset_password", name)
        return password

    @router.post("/admin/users/{name}/reset-password", include_in_schema=False, dependencies=[users_admin])
    async def post_reset(request: Request, name: str) -> HTMLResponse:
        try:
            password = await run_in_threadpool(reset_password, name)
        except AccountError as exc:
            msg = str(exc)
            return await run_in_threadpool(lambda: users_page(request, 400, error=msg))
        return await run_in_threadpool(lambda: users_page(
            request, notice=f"New password for {name}; their sessions ended.", secret=(f"One-time password for {name}", password)))

    # ----- tokens: pages ------------------------------------------------------------------------

    def tokens_page(request: Request, status: int = 200, *, error: str = "", notice: str = "",
                    secret: tuple[str, str] | None = None) -> HTMLResponse:
        return page(request, "admin_tokens.html", status, tokens=store.list_tokens(), users=store.list_users(),
                    error=error, notice=notice, secret=secret)

    @router.get("/admin/tokens", include_in_schema=False, dependencies=[users_admin])
    async def get_tokens(request: Request, done: str = "") -> HTMLResponse:
        return await run_in_threadpool(tokens_page, request, notice=done[:200])

    def create_token(user: str, name: str) -> str:
        token = store.create_token(user, name)
        audit.record_here("token.create", f"{user}/{name}", {"prefix": token.split("_")[1]})
        return token

    @router.post("/admin/tokens", include_in_schema=False, dependencies=[users_admin])
    async def post_token(request: Request) -> HTMLResponse:
        form = await form_fields(request)
        user, name = form.get("user", ""), form.get("name", "").strip()
        try:
            token = await run_in_threadpool(create_token, user, name)
        except AccountError as exc:
            msg = str(exc)
            return await run_in_threadpool(lambda: tokens_page(request, 400, error=msg))
        return await run_in_threadpool(lambda: tokens_page(
            request, 201, notice=f"Token {name!r} for {user} created.", secret=("Token (shown once: copy it now)", token)))

    def revoke(prefix: str) -> None:
        store.revoke_token(prefix)
        audit.record_here("token.revoke", prefix)

    @router.post("/admin/tokens/{prefix}/revoke", include_in_schema=False, dependencies=[users_admin])
    async def post_revoke(request: Request, prefix: str) -> Response:
        try:
            await run_in_threadpool(revoke, prefix)
        except AccountError as exc:
            msg = str(exc)
            return await run_in_threadpool(lambda: tokens_page(request, 404, error=msg))
        return RedirectResponse("/admin/tokens?" + urlencode({"done": f"Token {prefix} revoked."}), status_code=303)

    # ----- users and tokens: API ----------------------------------------------------------------

    @router.get("/api/v1/users", tags=["admin"], summary="List users", dependencies=[users_admin])
    def api_users() -> list[dict[str, Any]]:
        return [_user_dict(u) for u in store.list_users()]

    @router.post("/api/v1/users", tags=["admin"], status_code=201, summary="Create a user", dependencies=[users_admin])
    def api_add_user(body: NewUser) -> dict[str, Any]:
        password = body.password or generate_password()
        try:
            store.add_user(body.username, password, body.role, must_change_password=body.password is None)
        except AccountError as exc:
            raise HTTPException(409 if "exists" in str(exc) else 422, str(exc)) from None
        audit.record_here("user.create", body.username, {"role": body.role.value})
        out: dict[str, Any] = {"username": body.username, "role": body.role.value}
        if body.password is None:
            out["one_time_password"] = password
        return out

    @router.patch("/api/v1/users/{name}", tags=["admin"], summary="Change a user's role, or disable/enable them",
                  dependencies=[users_admin])
    def api_change_user(name: str, body: UserChange) -> dict[str, Any]:
        try:
            if body.role is not None:
                store.set_role(name, body.role)
                audit.record_here("user.role", name, {"role": body.role.value})
            if body.disabled is not None:
                store.set_disabled(name, body.disabled)
                audit.record_here("user.disable" if body.disabled else "user.enable", name)
        except AccountError as exc:
            raise HTTPException(404 if "no user" in str(exc) else 409, str(exc)) from None
        return next(_user_dict(u) for u in store.list_users() if u.username == name)

    @router.post("/api/v1/users/{name}/reset-password", tags=["admin"], summary="Give a user a new one-time password",
                 dependencies=[users_admin])
    def api_reset(name: str) -> dict[str, Any]:
        try:
            return {"username": name, "one_time_password": reset_password(name)}
        except AccountError as exc:
            raise HTTPException(404, str(exc)) from None

    @router.delete("/api/v1/users/{name}", tags=["admin"], status_code=204, summary="Delete a user with their sessions and tokens",
                   dependencies=[users_admin])
    def api_remove_user(name: str) -> None:
        try:
            store.remove_user(name)
        except AccountError as exc:
            raise HTTPException(404 if "no user" in str(exc) else 409, str(exc)) from None
        audit.record_here("user.remove", name)

    @router.get("/api/v1/tokens", tags=["admin"], summary="List API tokens (no secrets) with their last use", dependencies=[users_admin])
    def api_tokens() -> list[dict[str, Any]]:
        return [_token_dict(t) for t in store.list_tokens()]

    @router.post("/api/v1/tokens", tags=["admin"], status_code=201, summary="Create an API token (returned once)",
                 dependencies=[users_admin])
    def api_create_token(body: NewToken) -> dict[str, Any]:
        try:
            token = create_token(body.user, body.name)
        except AccountError as exc:
            raise HTTPException(404 if "no user" in str(exc) else 422, str(exc)) from None
        return {"token": token, "prefix": token.split("_")[1], "user": body.user, "name": body.name}

    @router.delete("/api/v1/tokens/{prefix}", tags=["admin"], status_code=204, summary="Revoke an API token at once",
                   dependencies=[users_admin])
    def api_revoke(prefix: str) -> None:
        try:
            revoke(prefix)
        except AccountError as exc:
            raise HTTPException(404, str(exc)) from None

    # ----- audit log ----------------------------------------------------------------------------

    @router.get("/admin/audit", include_in_schema=False, dependencies=[auditor])
    async def get_audit(
        request: Request, actor: str = "", action: str = "", shop: str = "", since: str = "", until: str = "",
        before_id: int | None = Query(None, ge=1),
    ) -> HTMLResponse:
        params = {"actor": actor, "action": action, "shop": shop, "since": since, "until": until}
        try:
            q = audit_query(actor, action, shop, since, until, AUDIT_PAGE_ROWS, before_id)
        except HTTPException as exc:
            return page(request, "admin_audit.html", 400, rows=[], actions=[], params=params, error=str(exc.detail),
                        csv_qs=urlencode(params), older_qs="")
        rows, actions = await run_in_threadpool(lambda: (audit.query(q), audit.actions()))
        older = urlencode({**params, "before_id": rows[-1].id}) if len(rows) == AUDIT_PAGE_ROWS else ""
        return page(request, "admin_audit.html", rows=rows, actions=actions, params=params, error="",
                    csv_qs=urlencode({k: v for k, v in params.items() if v}), older_qs=older)

    @router.get("/api/v1/audit", tags=["admin"], summary="The audit log, newest first (filterable)", dependencies=[auditor])
    def api_audit(
        actor: str = Query("", description="Exactly this user (or attempted login name)."),
        action: str = Query("", description="Exactly this action, or a prefix ending in '.' or '*' (e.g. 'rollout.')."),
        shop: str = Query("", description="Only actions on this shop."),
        since: str | None = Query(None, description="From this time: ISO 8601 (UTC if no zone) or Unix seconds."),
        until: str | None = Query(None, description="Before this time, same formats."),
        limit: int = Query(200, ge=1, le=5000),
        before_id: int | None = Query(None, ge=1, description="Only rows older than this id (paging)."),
    ) -> list[dict[str, Any]]:
        return [e.as_dict() for e in audit.query(audit_query(actor, action, shop, since, until, limit, before_id))]

    @router.get("/api/v1/audit.csv", tags=["admin"], summary="The audit log as CSV (same filters)", dependencies=[auditor],
                response_class=StreamingResponse)
    def api_audit_csv(
        actor: str = "", action: str = "", shop: str = "", since: str | None = None, until: str | None = None,
    ) -> StreamingResponse:
        q = audit_query(actor, action, shop, since, until, AUDIT_CSV_MAX_ROWS)
        rows = audit.query(q)
        audit.record_here("audit.export", "audit.csv", {k: v for k, v in
                                                        {"actor": actor, "action": action, "shop": shop, "since": since, "until": until}.items() if v})
        stamp = datetime.fromtimestamp(clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(csv_lines(rows), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="shopfleet-audit-{stamp}.csv"',
                                          "Cache-Control": "no-store"})

    return router

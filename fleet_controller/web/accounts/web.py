"""The guard on every HTTP route: authentication, role check and CSRF, plus login and logout.

It is one dependency on the whole app (``create_app(dependencies=...)`` or
``service.add_dependency``) rather than one each route declares, so a route added later (by
anyone, in any router) is guarded without remembering to ask: only the paths in ``open_paths``
(the login page, ``/healthz``, optionally ``/metrics``) and static assets are served to a
stranger. FastAPI's own ``/docs``, ``/redoc`` and ``/openapi.json`` sit outside the dependency
system and stay open; they describe the API and hold no fleet data. The permission a request needs comes from the pure
:func:`~fleet_controller.web.accounts.roles.required_permission` (read = ``view``; writing needs the
permission of its path prefix, unknown prefixes need ``fleet:admin``). Routers that want a
stricter check declare ``Depends(require(Permission.X))``.

Credentials: a browser session cookie (HttpOnly, SameSite=Lax, Secure under TLS) whose
state-changing requests must echo the session's CSRF token in ``X-CSRF-Token`` (or, for a
plain HTML form, its ``csrf_token`` field); or an API token in ``Authorization: Bearer sft_...``
for the CLI and automation (no CSRF: a browser never sends it by itself). Failed logins are throttled per
(user, client address) with exponential backoff and per client address, never per user alone.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from fleet_controller.registry.audit import AuditLog, RequestActor, set_request_actor
from fleet_controller.web.accounts.ratelimit import LoginBackoff, LoginRateLimiter
from fleet_controller.web.accounts.roles import (
    SAFE_METHODS,
    Permission,
    has_permission,
    required_permission,
)
from fleet_controller.web.accounts.store import AccountError, AccountStore, Principal

log = logging.getLogger(__name__)

SESSION_COOKIE = "sf_session"
LOGIN_CSRF_COOKIE = "sf_login_csrf"
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_BYTES = 65536
CSRF_HEADER = "x-csrf-token"
DEFAULT_OPEN_PATHS = frozenset({"/login", "/healthz", "/api/v1/enroll"})
"""``/api/v1/enroll`` authenticates its caller itself, by the one-time token in the body
(``fleet_controller.web.enrollment_api``): a node that enrolls has no account."""
OPEN_PREFIXES = ("/static/",)
PASSWORD_PATH = "/account/password"

_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)


class AuthMetrics:
    """Prometheus counters of logins and refused requests, on the registry passed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.logins = Counter(
            "shopfleet_auth_logins_total", "Login attempts by result (ok, bad_credentials, rate_limited, csrf).",
            ["result"], registry=registry,
        )
        self.refused = Counter(
            "shopfleet_auth_refused_total",
            "Requests refused by the guard, by reason (unauthenticated, forbidden, csrf, password_change).",
            ["reason"], registry=registry,
        )


def require(permission: Permission) -> Callable[[Request], Principal]:
    """Return a FastAPI dependency that yields the caller and refuses one without ``permission``."""

    def dependency(request: Request) -> Principal:
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            raise HTTPException(401, "not logged in: log in at /login or send an API token")
        if not has_permission(principal.role, permission):
            raise HTTPException(403, f"role {principal.role.value!r} lacks permission {permission.value!r}")
        return principal

    return dependency


def current_principal(request: Request) -> Principal | None:
    """Return the caller the guard authenticated, if any."""
    return getattr(request.state, "principal", None)


def _wants_html(request: Request) -> bool:
    return (request.method == "GET" and "text/html" in request.headers.get("accept", "")
            and not request.url.path.startswith("/api/"))


def safe_next(value: str | None) -> str:
    """Return ``value`` if it is a local path to go back to after login, else ``/``."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value or value.startswith("/login"):
        return "/"
    return value


class Guard:
    """The FastAPI dependency on the whole app that lets a request through only if its caller may make it.

    Refusals are HTTP errors with a ``detail`` that says what to do, and a ``reason`` counted in
    ``shopfleet_auth_refused_total``; a browser asking for a page is sent to the login page instead.
    """

    def __init__(self, store: AccountStore, metrics: AuthMetrics, open_paths: Iterable[str]) -> None:
        self.store = store
        self.metrics = metrics
        self.open_paths = frozenset(open_paths)

    def _authenticate(self, authorization: str | None, session_id: str | None) -> Principal | None:
        if authorization and authorization.lower().startswith("bearer "):
            return self.store.token_principal(authorization[7:].strip())
        return self.store.session_principal(session_id) if session_id else None

    def _refuse(self, request: Request, status: int, reason: str, detail: str) -> HTTPException:
        self.metrics.refused.labels(reason).inc()
        if status == 401 and _wants_html(request):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return HTTPException(303, "log in first", headers={"Location": f"/login?next={quote(target, safe='')}"})
        if reason == "password_change" and _wants_html(request):
            return HTTPException(303, detail, headers={"Location": PASSWORD_PATH})
        headers = {"WWW-Authenticate": 'Bearer realm="shopfleet"'} if status == 401 else None
        return HTTPException(status, detail, headers=headers)

    async def __call__(self, request: Request) -> None:
        path = request.url.path
        if path in self.open_paths or path.startswith(OPEN_PREFIXES):
            return
        try:
            principal = await run_in_threadpool(
                self._authenticate, request.headers.get("authorization"), request.cookies.get(SESSION_COOKIE)
            )
        except SQLAlchemyError as exc:
            log.error("cannot check credentials for %s: %s", path, exc)
            raise HTTPException(503, "account database unavailable; retry shortly") from None
        if principal is None:
            raise self._refuse(request, 401, "unauthenticated",
                               "not logged in: log in at /login, or send 'Authorization: Bearer <token>' "
                               "(create one with 'shopfleet tokens create')")
        if principal.must_change_password and path not in (PASSWORD_PATH, "/logout"):
            raise self._refuse(request, 403, "password_change", f"change the one-time password first at {PASSWORD_PATH}")
        perm = required_permission(request.method, path)
        if not has_permission(principal.role, perm):
            raise self._refuse(request, 403, "forbidden", f"role {principal.role.value!r} lacks permission {perm.value!r}; ask an admin")
        if principal.via == "session" and request.method not in SAFE_METHODS:
            sent = request.headers.get(CSRF_HEADER, "")
            if not sent and request.headers.get("content-type", "").startswith(FORM_TYPE):
                sent = (await _form(request)).get("csrf_token", "")
            if not (principal.csrf_token and _same(sent, principal.csrf_token)):
                raise self._refuse(request, 403, "csrf", f"missing or wrong {CSRF_HEADER} header: reload the page and try again")
        request.state.principal = principal
        # Who acts, for every audit record written while handling this request (registry.audit).
        set_request_actor(RequestActor(principal.username, client_address(request), principal.via))


def client_address(request: Request) -> str:
    """Return the client address as the app sees it (the TCP peer, or X-Forwarded-For from a trusted proxy)."""
    return request.client.host if request.client else ""


def _same(sent: str, expected: str) -> bool:
    """Compare a token in constant time; any text (not only ASCII) is a mismatch, never an error."""
    return bool(expected) and hmac.compare_digest(sent.encode("utf-8", "replace"), expected.encode())


def _render(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**ctx), status_code=status)


def _secure(request: Request, force: bool | None) -> bool:
    return request.url.scheme == "https" if force is None else force


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def auth_router(store: AccountStore, metrics: AuthMetrics, *, secure_cookies: bool | None = None,
                pair_backoff: LoginBackoff | None = None, addr_limiter: LoginRateLimiter | None = None) -> APIRouter:
    """Return the router with the login, logout and change-password pages.

    Failed logins are throttled per (user, client address) with exponential backoff and per
    address with a sliding window, never per user alone: a guesser elsewhere cannot lock the real
    user out (see :mod:`fleet_controller.web.accounts.ratelimit`). The client address is the TCP
    peer, or the X-Forwarded-For entry only when the peer is one of ``api.trusted_proxies``
    (uvicorn's proxy-headers middleware, configured by the service).
    """
    router = APIRouter(include_in_schema=False)
    audit = AuditLog(store.engine)
    pair_backoff = pair_backoff or LoginBackoff()
    addr_limiter = addr_limiter or LoginRateLimiter(max_failures=30, window_s=300)

    def login_page(request: Request, status: int = 200, error: str = "", next_url: str = "/", username: str = "") -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        resp = _render("login.html", status, csrf=token, error=error, next_url=next_url, username=username)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request, secure_cookies), path="/login")
        return resp

    @router.get("/login")
    async def get_login(request: Request, next: str = "/") -> HTMLResponse:
        return login_page(request, next_url=safe_next(next))

    @router.post("/login")
    async def post_login(request: Request) -> Response:
        form = await _form(request)
        username, password = form.get("username", ""), form.get("password", "")
        next_url = safe_next(form.get("next"))
        if not _same(form.get("csrf_token", ""), request.cookies.get(LOGIN_CSRF_COOKIE, "")):
            metrics.logins.labels("csrf").inc()
            await run_in_threadpool(audit.record, username, "login.failed", username, {"why": "csrf"}, client_address(request), outcome="csrf")
            return login_page(request, 403, "The form expired: please log in again.", next_url, username)
        addr = request.client.host if request.client else "?"
        ukey, akey = f"user:{username}\x00addr:{addr}", f"addr:{addr}"
        wait = max(pair_backoff.retry_after(ukey), addr_limiter.retry_after(akey))
        if wait > 0:
            metrics.logins.labels("rate_limited").inc()
            await run_in_threadpool(audit.record, username, "login.failed", username, {"why": "rate_limited"}, addr, outcome="rate_limited")
            log.warning("login for %r from %s refused: too many failures, retry in %.0f s", username, addr, wait)
            resp: Response = login_page(request, 429, f"Too many failed logins: try again in {int(wait) + 1} seconds.", next_url, username)
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp
        ok = await run_in_threadpool(store.verify_password, username, password)
        if not ok:
            pair_backoff.failed(ukey)
            addr_limiter.failed(akey)
            metrics.logins.labels("bad_credentials").inc()
            await run_in_threadpool(audit.record, username, "login.failed", username, {"why": "bad_credentials"}, addr, outcome="bad_credentials")
            log.info("failed login for %r from %s", username, addr)
            return login_page(request, 401, "Wrong user name or password.", next_url, username)
        pair_backoff.succeeded(ukey)
        metrics.logins.labels("ok").inc()
        sid, _csrf = await run_in_threadpool(store.create_session, username)
        resp = RedirectResponse(next_url, status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", secure=_secure(request, secure_cookies), path="/")
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        log.info("user %r logged in from %s", username, addr)
        await run_in_threadpool(audit.record, username, "login", username, None, addr, via="session")
        return resp

    @router.post("/logout")
    async def post_logout(request: Request) -> Response:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            await run_in_threadpool(store.end_session, sid)
            await run_in_threadpool(audit.record_here, "logout")
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @router.get(PASSWORD_PATH)
    async def get_password(request: Request) -> HTMLResponse:
        p = current_principal(request)
        assert p is not None  # the guard let us in
        return _render("password.html", user=p, csrf=p.csrf_token or "", error="")

    @router.post(PASSWORD_PATH)
    async def post_password(request: Request) -> Response:
        p = current_principal(request)
        assert p is not None
        form = await _form(request)
        if form.get("new_password") != form.get("confirm"):
            return _render("password.html", 400, user=p, csrf=p.csrf_token or "", error="The two passwords differ.")
        try:
            await run_in_threadpool(store.set_password, p.username, form.get("new_password", ""))
        except AccountError as exc:
            return _render("password.html", 400, user=p, csrf=p.csrf_token or "", error=str(exc))
        await run_in_threadpool(audit.record_here, "account.password_changed", p.username)
        sid, _ = await run_in_threadpool(store.create_session, p.username)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="lax", secure=_secure(request, secure_cookies), path="/")
        return resp

    return router


@dataclass(frozen=True)
class Auth:
    """What to add to the app: the login router and the guard dependency for every route."""

    router: APIRouter
    guard: Guard
    metrics: AuthMetrics

    @property
    def dependency(self) -> Any:
        """Return ``Depends(guard)`` for ``create_app(dependencies=...)`` or ``service.add_dependency``."""
        return Depends(self.guard)


def build_auth(store: AccountStore, registry: CollectorRegistry, *, open_metrics: bool = True,
               secure_cookies: bool | None = None) -> Auth:
    """Return the login router and the guard for an app.

    ``open_metrics`` leaves ``/metrics`` readable without login (Prometheus scrapers carry no
    cookie; keep the port internal or set it false and scrape with a token). ``secure_cookies=None``
    marks cookies Secure exactly when the request came over https.
    """
    metrics = AuthMetrics(registry)
    open_paths = set(DEFAULT_OPEN_PATHS) | ({"/metrics"} if open_metrics else set())
    return Auth(auth_router(store, metrics, secure_cookies=secure_cookies), Guard(store, metrics, open_paths), metrics)


def announce_initial_admin(store: AccountStore, announce: Callable[[str], None] | None = None) -> str | None:
    """Create the first admin when there are no users and announce its one-time password; return it."""
    try:
        password = store.ensure_initial_admin()
    except SQLAlchemyError as exc:
        log.error("cannot create the first admin (%s): run the migrations ('shopfleet controller' does) first", exc)
        return None
    if password:
        line = f"first start: created user 'admin' with one-time password {password} (you must change it at first login)"
        (announce or (lambda s: log.warning("%s", s)))(line)
    return password

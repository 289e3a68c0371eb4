"""Enrollment over the API: ``POST /api/v1/enroll`` for nodes, tokens and credentials for admins.

* ``POST /api/v1/enroll`` (open: the one-time token in the body is the credential; the guard
  lets this one path through, see :data:`ENROLL_PATH`): ``{"token": ..., "csr": PEM}`` ->
  the node's certificate, the CA certificate and the broker's address. HTTPS only, unless
  ``enrollment.allow_plain_http``. Every attempt is counted in
  ``shopfleet_controller_enrollments_total{result}`` and audited (``node.enroll``); a client
  address with ``max_failures_per_address`` failures in 10 minutes is answered 429 until the
  window passes.
* ``GET/POST /api/v1/enrollment-tokens``, ``DELETE /api/v1/enrollment-tokens/{id}``: list, make
  (shown once) and revoke tokens.
* ``GET /api/v1/nodes/{shop}/{node}/credentials``, ``POST .../credentials/rotate``
  (``?revoke_previous=true`` cuts the old credentials off at once) and ``POST .../credentials/revoke``.

Admin routes need ``fleet:admin`` (the guard already demands it for writes below these
prefixes; each route declares it too, so listing needs it as well) and are audited.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fleet_controller.enrollment import NodeCredentials
from fleet_controller.host import ControllerHost
from fleet_controller.pki import PkiError
from fleet_controller.registry.audit import AuditLog
from fleet_controller.registry.enrollment import EnrollmentError, TokenRefused
from fleet_controller.web.accounts.roles import Permission
from fleet_controller.web.accounts.web import require

log = logging.getLogger(__name__)

ENROLL_PATH = "/api/v1/enroll"
MAX_BODY_BYTES = 16 * 1024
"""A token and a P-256 CSR are under 1 KiB; an RSA-4096 CSR under 4 KiB."""
FAILURE_WINDOW_S = 600.0
MAX_TRACKED_ADDRESSES = 10_000


class EnrollRequest(BaseModel):
    """Body of ``POST /api/v1/enroll``."""

    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=256, description="The one-time enrollment token (sfe_...).")
    csr: str = Field(min_length=1, max_length=12_000, description="PEM certificate signing request made with the node's own key.")


class NewEnrollmentToken(BaseModel):
    """Body of ``POST /api/v1/enrollment-tokens``."""

    model_config = ConfigDict(extra="forbid")
    shop: str = Field(min_length=1, max_length=63, description="Shop id of the node.")
    node: str = Field(min_length=1, max_length=63, description="Node id the token enrolls (the certificate's CN is <shop>.<node>).")
    ttl: str | None = Field(None, max_length=16, description="Lifetime: seconds or 30m, 1h, 2d (default enrollment.token_ttl_s).")


class RotateBody(BaseModel):
    """Body of ``POST /api/v1/nodes/{shop}/{node}/credentials/rotate`` (optional)."""

    model_config = ConfigDict(extra="forbid")
    ttl: str | None = Field(None, max_length=16, description="Lifetime of the new token.")


class EnrollmentMetrics:
    """Counters of enrollment, revocation and broker reloads."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.enrollments = Counter(
            "shopfleet_controller_enrollments_total",
            "Node enrollment attempts by result (ok, malformed, unknown, used, expired, bad_csr, bad_request, plain_http, "
            "rate_limited, disabled, error).", ["result"], registry=registry)
        self.revocations = Counter("shopfleet_controller_credential_revocations_total",
                                   "Node credential revocations done through the API.", registry=registry)
        self.reloads = Counter("shopfleet_controller_broker_reloads_total",
                               "Broker reloads after a credential change, by result (ok, failed, not_configured).",
                               ["result"], registry=registry)


class FailureLimiter:
    """At most ``limit`` failures per client address per window; in memory, bounded."""

    def __init__(self, limit: int, window_s: float = FAILURE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def _recent(self, address: str) -> collections.deque[float]:
        q = self._failures.get(address)
        if q is None:
            return collections.deque()
        cutoff = self.clock() - self.window_s
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, address: str) -> bool:
        """Return whether ``address`` used up its failures."""
        return len(self._recent(address)) >= self.limit

    def failed(self, address: str) -> None:
        """Count one failure of ``address``."""
        q = self._recent(address)
        q.append(self.clock())
        self._failures[address] = q
        self._failures.move_to_end(address)
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def enrollment_router(creds: NodeCredentials | None, audit: AuditLog, metrics: EnrollmentMetrics, *,
                      max_failures: int = 10, allow_plain_http: bool = False) -> APIRouter:
    """Return the router (``creds`` None: enrollment is not configured and every route answers 503)."""
    r = APIRouter()
    admin = Depends(require(Permission.FLEET_ADMIN))
    limiter = FailureLimiter(max_failures)

    def need() -> NodeCredentials:
        if creds is None:
            raise HTTPException(503, "enrollment is not configured on this controller: set enrollment.pki_dir (docs/controller.md)")
        return creds

    async def refuse(request: Request, status: int, result: str, message: str, *, count_failure: bool = True) -> JSONResponse:
        metrics.enrollments.labels(result).inc()
        address = _client(request)
        if count_failure:
            limiter.failed(address)
        log.warning("enrollment from %s refused (%s): %s", address or "?", result, message)
        if result != "rate_limited":  # the limiter bounds how many refusals one address can write here
            await run_in_threadpool(audit.record, "anonymous", "node.enroll", "", {"result": result}, address,
                                    via="enroll", outcome=f"refused: {result}")
        return JSONResponse({"detail": message, "reason": result}, status_code=status,
                            headers={"Retry-After": str(int(FAILURE_WINDOW_S))} if status == 429 else None)

    @r.post(ENROLL_PATH, tags=["enrollment"], summary="Enroll a node: a one-time token and a CSR give its certificate",
            responses={400: {}, 401: {}, 403: {}, 422: {}, 429: {}, 503: {}})
    async def enroll(request: Request) -> JSONResponse:
        address = _client(request)
        if creds is None:
            metrics.enrollments.labels("disabled").inc()
            return JSONResponse({"detail": "enrollment is not configured on this controller: set enrollment.pki_dir"}, status_code=503)
        if request.url.scheme != "https" and not allow_plain_http:
            return await refuse(request, 403, "plain_http",
                          "enrollment needs HTTPS (the token and the certificate cross the network): use the controller's https:// "
                          "address (api.tls_cert_file/tls_key_file); enrollment.allow_plain_http is for tests only",
                          count_failure=False)
        if limiter.blocked(address):
            return await refuse(request, 429, "rate_limited",
                          f"too many failed enrollments from {address}: wait {FAILURE_WINDOW_S / 60:.0f} minutes", count_failure=False)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                return await refuse(request, 413, "bad_request", f"body larger than {MAX_BODY_BYTES} bytes: send a token and one CSR")
        try:
            body = EnrollRequest.model_validate(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            return await refuse(request, 400, "bad_request", f"body must be JSON {{\"token\": ..., \"csr\": PEM}} ({str(exc)[:300]})")
        try:
            done = await run_in_threadpool(creds.enroll, body.token.strip(), body.csr, address)
        except TokenRefused as exc:
            return await refuse(request, 401, exc.reason, str(exc))
        except PkiError as exc:
            return await refuse(request, 422, "bad_csr", f"{exc} (the token was not used: fix the CSR and retry)")
        except Exception:
            metrics.enrollments.labels("error").inc()
            log.exception("enrollment from %s failed", address)
            return JSONResponse({"detail": "the controller could not sign the certificate (see its log); the token was not used"},
                                status_code=500)
        metrics.enrollments.labels("ok").inc()
        await run_in_threadpool(audit.record, f"node:{done.cn}", "node.enroll", done.cn,
                                {"serial": done.serial, "token_id": done.token_id, "superseded": list(done.superseded),
                                 "broker_reload": done.broker_reload}, address, shop=done.shop, via="enroll")
        log.info("node %s enrolled from %s: certificate %s until %s", done.cn, address, done.serial, done.not_after)
        return JSONResponse(done.response(), status_code=201, headers={"Cache-Control": "no-store"})

    # ----- tokens ---------------------------------------------------------------------------------

    def token_out(token: str, rec: Any, request: Request) -> dict[str, Any]:
        base = str(request.base_url).rstrip("/")
        return {**rec.as_dict(time.time()), "token": token,
                "command": f"shopfleet agent enroll --controller {base} --token-file TOKEN_FILE --ca-file ca.crt --out /etc/shopfleet/tls"}

    @r.get("/api/v1/enrollment-tokens", tags=["enrollment"], summary="List enrollment tokens (never their secrets)", dependencies=[admin])
    def list_tokens(shop: str = Query("", max_length=63), node: str = Query("", max_length=63)) -> list[dict[str, Any]]:
        c = need()
        now = time.time()
        return [t.as_dict(now) for t in c.tokens.list(shop=shop or None, node=node or None)]

    @r.post("/api/v1/enrollment-tokens", tags=["enrollment"], status_code=201,
            summary="Make a one-time enrollment token for a node (returned once)", dependencies=[admin])
    def create_token(body: NewEnrollmentToken, request: Request) -> JSONResponse:
        c = need()
        who = getattr(getattr(request.state, "principal", None), "username", "") or ""
        try:
            token, rec = c.create_token(body.shop, body.node, body.ttl, who)
        except EnrollmentError as exc:
            raise HTTPException(422, str(exc)) from None
        audit.record_here("enrollment_token.create", f"{body.shop}/{body.node}", {"id": rec.id, "expires_at": rec.expires_at},
                          shop=body.shop)
        return JSONResponse(token_out(token, rec, request), status_code=201, headers={"Cache-Control": "no-store"})

    @r.delete("/api/v1/enrollment-tokens/{token_id}", tags=["enrollment"], status_code=204,
              summary="Revoke an unused enrollment token", dependencies=[admin])
    def revoke_token(token_id: int) -> None:
        c = need()
        try:
            rec = c.tokens.revoke(token_id)
        except EnrollmentError as exc:
            raise HTTPException(404 if "no enrollment token" in str(exc) else 409, str(exc)) from None
        audit.record_here("enrollment_token.revoke", f"{rec.shop}/{rec.node}", {"id": rec.id}, shop=rec.shop)

    # ----- node credentials -------------------------------------------------------------------------

    @r.get("/api/v1/nodes/{shop}/{node}/credentials", tags=["enrollment"], summary="A node's certificates and tokens",
           dependencies=[admin])
    def credentials(shop: str, node: str) -> dict[str, Any]:
        c = need()
        try:
            certs = c.certificates(shop, node)
        except EnrollmentError as exc:
            raise HTTPException(422, str(exc)) from None
        now = time.time()
        return {"shop": shop, "node": node, "certificates": [{**r.__dict__, "expired": r.expired()} for r in certs],
                "tokens": [t.as_dict(now) for t in c.tokens.list(shop=shop, node=node)]}

    @r.post("/api/v1/nodes/{shop}/{node}/credentials/rotate", tags=["enrollment"], status_code=201,
            summary="New credentials for a node: a token to re-enroll with; ?revoke_previous=true revokes the old ones now",
            dependencies=[admin])
    def rotate(shop: str, node: str, request: Request, body: RotateBody | None = None,
               revoke_previous: bool = Query(False, description="Revoke the node's certificates and password now (suspected "
                                             "compromise) instead of when it re-enrolls.")) -> JSONResponse:
        c = need()
        who = getattr(getattr(request.state, "principal", None), "username", "") or ""
        try:
            token, rec, revoked = c.rotate(shop, node, body.ttl if body else None, who, revoke_previous=revoke_previous)
        except EnrollmentError as exc:
            raise HTTPException(422, str(exc)) from None
        if revoked is not None:
            metrics.revocations.inc()
        audit.record_here("node.credentials.rotate", f"{shop}/{node}",
                          {"token_id": rec.id, "revoke_previous": revoke_previous,
                           **({"revoked": revoked.as_dict()} if revoked else {})}, shop=shop)
        out = token_out(token, rec, request)
        out["revoked"] = revoked.as_dict() if revoked else None
        return JSONResponse(out, status_code=201, headers={"Cache-Control": "no-store"})

    @r.post("/api/v1/nodes/{shop}/{node}/credentials/revoke", tags=["enrollment"],
            summary="Revoke a node's certificates (CRL), password and ACL rights, and reload the broker", dependencies=[admin])
    def revoke(shop: str, node: str) -> dict[str, Any]:
        c = need()
        try:
            done = c.revoke(shop, node)
        except EnrollmentError as exc:
            raise HTTPException(404 if "nothing to revoke" in str(exc) else 422, str(exc)) from None
        metrics.revocations.inc()
        audit.record_here("node.credentials.revoke", f"{shop}/{node}", done.as_dict(), shop=shop,
                          outcome="ok" if done.broker_reload == "ok" else f"broker reload: {done.broker_reload}"[:500])
        return done.as_dict()

    return r


def node_revoker(creds: NodeCredentials | None, metrics: EnrollmentMetrics) -> Callable[[str, str], dict[str, Any] | None]:
    """Return what removing a node calls to revoke its credentials first (``DELETE /api/v1/shops/{shop}/nodes/{node}``).

    It answers None when enrollment is not configured (nothing here to revoke: the operator removes
    the node's password and ACL lines from the broker's files), the revocation (as
    ``POST .../credentials/revoke`` answers it, and counted alike) otherwise, with
    ``"revoked_serials": []`` and nothing removed when the node had no live credentials left.
    """
    def revoke(shop: str, node: str) -> dict[str, Any] | None:
        if creds is None:
            return None
        try:
            done = creds.revoke(shop, node)
        except EnrollmentError as exc:
            if "nothing to revoke" not in str(exc):
                raise
            return {"shop": shop, "node": node, "revoked_serials": [], "password_removed": False, "acl_removed": False,
                    "broker_reload": "not needed"}
        metrics.revocations.inc()
        return done.as_dict()

    return revoke


def install(host: ControllerHost) -> NodeCredentials | None:
    """Add the enrollment routes to a controller (before ``start()``); return the credentials service, if configured."""
    settings = host.settings.enrollment
    metrics = EnrollmentMetrics(host.metrics_registry)
    creds = None
    if settings is not None:
        creds = NodeCredentials(settings, host.engine,
                                on_reload=lambda result: metrics.reloads.labels(result.split(":")[0]).inc())
        try:
            creds.check()
        except PkiError as exc:
            raise ValueError(f"enrollment.pki_dir: {exc}") from None
    host.app_state["revoke_node"] = node_revoker(creds, metrics)
    host.add_router(enrollment_router(creds, AuditLog(host.engine), metrics,
                                      max_failures=settings.max_failures_per_address if settings else 10,
                                      allow_plain_http=settings.allow_plain_http if settings else False))
    return creds

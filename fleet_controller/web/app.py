"""The controller's FastAPI application, built by one factory that other parts extend.

:func:`create_app` takes the registry, the metrics registry and any extra routers and
dependencies, so the rollout and dashboard code include their routers without this module
knowing them, and authentication can be added to every route at once through
``dependencies`` (``Depends(...)`` values FastAPI applies to every route, ``/healthz`` and
``/metrics`` included; a dependency that must let probes through checks ``request.url.path``).
Nothing here touches MQTT: the app reads the registry through its read models, writes shop
registrations through the single writer, and asks ``health()`` how the process is.

Two things every response gets from here, whichever router made it: the security headers of
:data:`SECURITY_HEADERS` (a Content Security Policy that allows no inline script and no other
origin, no framing, no MIME sniffing, no referrer to other sites), and the API documentation
(``/docs`` Swagger UI, ``/redoc`` ReDoc) served from the vendored copies in
``fleet_controller/web/static/vendor/`` with their start-up code in static files, so the pages
work offline and under that policy (FastAPI's own pages load from a CDN and run inline script).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.params import Depends
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request

from fleet_controller.host import ShopWriter
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.api import build_router
from fleet_controller.web.series_api import series_router

API_TITLE = "shopfleet fleet controller"

VENDOR_DIR = Path(__file__).resolve().parent / "static" / "vendor"
VENDOR_FILES = {
    str(p.relative_to(VENDOR_DIR)): p
    for p in VENDOR_DIR.rglob("*")
    if p.is_file() and (p.suffix in (".js", ".css", ".txt") or p.name in ("LICENSE", "NOTICE"))
}
"""Served under ``/static/vendor/`` (open, like the dashboard's static files). A fixed list built at
import, so no path from a URL ever reaches the file system."""

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",  # no inline script, no eval, no other origin: an injected <script> does not run
    "style-src 'self' 'unsafe-inline'",  # Swagger UI and ReDoc set style attributes; styles cannot run code
    "img-src 'self' data:",
    "font-src 'self'",
    "connect-src 'self'",
    "worker-src 'self' blob:",  # ReDoc builds its search worker from a blob
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate CSP 2: no clickjacking
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # shop ids in URLs never leak to other sites
    "Cross-Origin-Opener-Policy": "same-origin",
}
"""Set on every response that does not set the header itself."""

DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><link rel="icon" href="data:,">{head}</head>
<body data-openapi="{openapi}">{body}</body></html>
"""


def _docs_page(title: str, openapi_url: str, head: str, body: str) -> HTMLResponse:
    html = DOCS_HTML.format(title=escape(title), openapi=escape(openapi_url), head=head, body=body)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


def add_security_headers(app: FastAPI) -> None:
    """Add :data:`SECURITY_HEADERS` to every response of ``app`` (a header a route set itself wins)."""

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def add_docs(app: FastAPI, openapi_url: str = "/openapi.json") -> None:
    """Serve Swagger UI at ``/docs`` and ReDoc at ``/redoc`` from the vendored assets.

    Plain Starlette routes, outside the dependency system like FastAPI's own ``/openapi.json``:
    they describe the API and hold no fleet data, so they stay open (the guard lets them pass).
    """

    async def swagger(_request: Request) -> HTMLResponse:
        return _docs_page(
            f"{API_TITLE} - Swagger UI", openapi_url,
            '<link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css">'
            '<script src="/static/vendor/swagger-ui/swagger-ui-bundle.js" defer></script>'
            '<script src="/static/docs-init.js" defer></script>',
            '<div id="swagger-ui"></div>')

    async def redoc(_request: Request) -> HTMLResponse:
        return _docs_page(
            f"{API_TITLE} - ReDoc", openapi_url,
            '<script src="/static/vendor/redoc/redoc.standalone.js" defer></script>'
            '<script src="/static/docs-init.js" defer></script>',
            '<div id="redoc"></div>')

    async def vendor(request: Request) -> Response:
        path = VENDOR_FILES.get(request.path_params["name"])
        if path is None:
            return JSONResponse({"detail": "no such vendored file"}, status_code=404)
        media = "text/plain; charset=utf-8" if path.suffix not in (".js", ".css") else None
        return FileResponse(path, media_type=media, headers={"Cache-Control": "public, max-age=86400"})

    async def docs_init(_request: Request) -> Response:
        return FileResponse(VENDOR_DIR.parent / "docs-init.js", headers={"Cache-Control": "public, max-age=300"})

    app.router.add_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.router.add_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.router.add_route("/static/docs-init.js", docs_init, methods=["GET"], include_in_schema=False)
    app.router.add_route("/static/vendor/{name:path}", vendor, methods=["GET"], include_in_schema=False)


def create_app(
    reader: RegistryReader,
    metrics_registry: CollectorRegistry,
    *,
    writer: ShopWriter | None = None,
    routers: Sequence[APIRouter] = (),
    dependencies: Sequence[Depends] = (),
    health: Callable[[], dict[str, Any]] = lambda: {"status": "ok"},
    state: dict[str, Any] | None = None,
) -> FastAPI:
    """Return the API app: registry routes, /healthz, /metrics, plus ``routers``; ``dependencies`` guard every route.

    ``state`` entries become attributes of ``app.state`` (e.g. the service, the event bus) for
    routers that need them. ``writer`` (the single registry writer) serves ``PUT /api/v1/shops/{shop}`` and
    ``DELETE /api/v1/shops/{shop}/nodes/{node}``; without it those routes answer 503.
    """
    app = FastAPI(
        title=API_TITLE,
        version="1",
        description="Registry of shops and nodes, their presence, facts, history and events. See docs/controller.md.",
        dependencies=list(dependencies),
        docs_url=None,
        redoc_url=None,
    )
    add_security_headers(app)
    add_docs(app)
    app.state.reader = reader
    app.state.writer = writer
    app.state.metrics_registry = metrics_registry
    for key, value in (state or {}).items():
        setattr(app.state, key, value)
    app.include_router(build_router())
    app.include_router(series_router())
    for router in routers:
        app.include_router(router)

    @app.get("/healthz", tags=["ops"], summary="Liveness and readiness of the controller")
    def healthz() -> JSONResponse:
        report = health()
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app

"""The controller's FastAPI application, built by one factory that other parts extend.

:func:`create_app` takes the registry, the metrics registry and any extra routers and
dependencies, so the rollout and dashboard code include their routers without this module
knowing them, and authentication can be added to every route at once through
``dependencies`` (``Depends(...)`` values FastAPI applies to every route, ``/healthz`` and
``/metrics`` included; a dependency that must let probes through checks ``request.url.path``).
Nothing here touches MQTT: the app reads the registry through its read models, writes shop
registrations through the single writer, and asks ``health()`` how the process is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.params import Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from fleet_controller.host import ShopWriter
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.api import build_router
from fleet_controller.web.series_api import series_router

API_TITLE = "shopfleet fleet controller"


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
    routers that need them. ``writer`` (the single registry writer) serves ``PUT /api/v1/shops/{shop}``;
    without it that route answers 503.
    """
    app = FastAPI(
        title=API_TITLE,
        version="1",
        description="Registry of shops and nodes, their presence, facts, history and events. See docs/controller.md.",
        dependencies=list(dependencies),
    )
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

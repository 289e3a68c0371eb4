"""The time-series API (``GET /api/v1/shops/{shop}/series``) and the vendored chart library.

The dashboard's charts (``static/charts.js``) ask this route for one series of one shop over a
range; the registry (:func:`fleet_controller.registry.series.read_series`) picks the resolution
from the range, so a 1-hour chart gets raw samples and a 7-day one 1-minute buckets, and never
more than ``retention.series.max_points`` points per line. A GET, so any logged-in role (viewer
and up) may read it, like every other read.

uPlot (MIT, ``fleet_controller/web/static/vendor/uplot``) is served from the package under
``/static/vendor/uplot/``: the dashboard loads nothing from a CDN, so it works on a shop network
without internet access and under a strict Content-Security-Policy.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from fleet_controller.registry.read import NotFound, RegistryReader
from fleet_controller.registry.series import (
    SERIES_NAME_PATTERN,
    SeriesData,
    SeriesRangeError,
    read_series,
)
from fleet_controller.settings import SeriesSettings

VENDOR_DIR = Path(__file__).resolve().parent / "static" / "vendor" / "uplot"
VENDOR_FILES = {p.name: p for p in VENDOR_DIR.iterdir() if p.is_file()}
"""A fixed list, so no path from a URL reaches the file system."""

DEFAULT_RANGE_S = 3600.0


def _settings(request: Request) -> SeriesSettings:
    """The running controller's series settings (``app.state.service``), or the defaults in a bare app."""
    service = getattr(request.app.state, "service", None)
    settings = getattr(getattr(getattr(service, "settings", None), "retention", None), "series", None)
    return settings if isinstance(settings, SeriesSettings) else SeriesSettings()


def series_router() -> APIRouter:
    """Return the router of the series API and the vendored uPlot files."""
    router = APIRouter()

    @router.get(
        "/api/v1/shops/{shop}/series", tags=["series"], response_model=SeriesData,
        summary="One time series of a shop, bucketed for a chart",
    )
    async def get_series(
        request: Request,
        shop: str,
        name: str = Query(pattern=SERIES_NAME_PATTERN, description="Series: fps, occupancy, temperature_c, shelf_weight_g, "
                          "cpu_percent, cpu_load_1m, mem_used_percent, disk_used_percent, cpu_temp_c, or any reading name."),
        node: str | None = Query(None, max_length=63, description="Only this node's samples."),
        source: str | None = Query(None, max_length=128, description="Only this source (camera, fridge, slot)."),
        start: float | None = Query(None, alias="from", description="Start, Unix seconds; default: one hour before 'to'."),
        end: float | None = Query(None, alias="to", description="End, Unix seconds; default: now."),
        step: float | None = Query(None, gt=0, le=86400 * 30, description="Smallest bucket width in seconds; default: what fits max_points."),
        total: bool = Query(False, description="Add a line source='total' summing the lines per bucket (e.g. shop occupancy)."),
    ) -> SeriesData:
        reader: RegistryReader = request.app.state.reader
        now = time.time()
        end_s = now if end is None else end
        start_s = end_s - DEFAULT_RANGE_S if start is None else start
        try:
            await run_in_threadpool(reader.shop, shop)
        except NotFound:
            raise HTTPException(404, f"no shop {shop!r}: list shops with GET /api/v1/shops") from None
        try:
            return await run_in_threadpool(
                read_series, reader.engine, shop, name, start=start_s, end=end_s, node=node, source=source, step=step,
                total=total, settings=_settings(request), now=now,
            )
        except SeriesRangeError as exc:
            raise HTTPException(422, str(exc)) from None

    @router.get("/static/vendor/uplot/{name}", include_in_schema=False)
    async def vendor(name: str) -> FileResponse:
        path = VENDOR_FILES.get(name)
        if path is None:
            raise HTTPException(404, f"no vendored uPlot file {name!r}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})

    return router

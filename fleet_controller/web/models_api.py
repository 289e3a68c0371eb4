"""Model packages over HTTP: ML engineers upload them, shops download them by byte range.

* ``POST /api/v1/models?name=NAME`` (body: a tar of the package directory; the ``rollouts``
  permission, like releases): stores the package and answers its reference (``name``, ``sha256``,
  ``size_bytes``, ``archive_sha256``, ``archive_bytes``), which ``shopfleet release create --model``
  pins in the release. Storing the same package twice is a no-op.
* ``GET /api/v1/models``: the stored packages (any logged-in role).
* ``GET``/``HEAD /api/v1/models/{sha256}/archive``: the package's archive, for a shop's applier.
  Authenticated by the **model token** of the shop's signed desired state
  (``Authorization: Bearer v1....``), not by a user account, so this one route is a plain
  Starlette route that the login guard (a FastAPI dependency) does not run on; it checks the
  token itself. ``Range: bytes=START-[END]`` answers ``206`` with that slice, which is what lets
  a shop resume a download cut by a flaky uplink; an unsatisfiable range answers ``416``. The
  ``ETag`` is the archive's sha256.

Refused downloads are counted by reason in ``shopfleet_controller_model_downloads_refused_total``
and served bytes in ``shopfleet_controller_model_bytes_served_total``. See docs/models.md.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Query, Request
from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.requests import Request as RawRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from fleet_controller.rollout.models_store import (
    MAX_ARCHIVE_BYTES,
    ModelStore,
    ModelStoreError,
    ModelTokenInvalid,
    check_token,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fleet_controller.host import ControllerHost

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class ModelApiMetrics:
    """Counters of the download route."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.served = Counter("shopfleet_controller_model_bytes_served_total", "Model archive bytes sent to shops.", registry=registry)
        self.refused = Counter(
            "shopfleet_controller_model_downloads_refused_total",
            "Model downloads refused, by reason (no_token, malformed, forged, expired, wrong_package, not_found, bad_range, no_key).",
            ["reason"], registry=registry,
        )


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return the inclusive (start, end) of a single ``bytes=`` range, None for the whole file; ValueError if unsatisfiable."""
    if not header:
        return None
    m = RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise ValueError(f"Range {header!r}: send one range, 'bytes=START-' or 'bytes=START-END'")
    if not m.group(1):  # suffix: the last N bytes
        n = int(m.group(2))
        if n == 0:
            raise ValueError("Range asks for the last 0 bytes")
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    if start >= size or end < start:
        raise ValueError(f"Range {header!r} lies outside the {size}-byte archive")
    return start, end


def build_router(store: ModelStore, public_keys: list[Ed25519PublicKey], metrics: ModelApiMetrics) -> APIRouter:
    """Return the router: upload and list (behind the login guard), archive download (model token)."""
    r = APIRouter(prefix="/api/v1", tags=["model packages"])

    @r.post("/models", status_code=201, summary="Upload a model package (a tar of its directory)")
    async def upload(request: Request, name: str = Query(pattern=NAME_RE, description="Package name, e.g. the directory name.")) -> dict[str, Any]:
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > MAX_ARCHIVE_BYTES:
                    raise HTTPException(413, f"package above {MAX_ARCHIVE_BYTES} bytes")
                tmp.write(chunk)
            tmp.seek(0)
            try:
                p = await run_in_threadpool(store.put_archive, tmp, name)
            except ModelStoreError as exc:
                raise HTTPException(422, str(exc)) from None
        return {"name": p.name, "sha256": p.sha256, "size_bytes": p.size_bytes, "archive_sha256": p.archive_sha256, "archive_bytes": p.archive_bytes}

    @r.get("/models", summary="List stored model packages, newest first")
    def list_models() -> list[dict[str, Any]]:
        return [asdict(p) for p in store.list()]

    async def archive(request: RawRequest) -> Response:
        sha = request.path_params["sha256"]
        if not SHA_RE.match(sha):
            metrics.refused.labels("not_found").inc()
            return JSONResponse({"detail": "not a package sha256 (64 lowercase hex digits)"}, 404)
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            metrics.refused.labels("no_token").inc()
            return JSONResponse({"detail": "send 'Authorization: Bearer <model token>' (model.token of the shop's desired state)"}, 401,
                                headers={"WWW-Authenticate": 'Bearer realm="shopfleet-models"'})
        if not public_keys:
            metrics.refused.labels("no_key").inc()
            return JSONResponse({"detail": "this controller has no signing key configured, so it cannot check model tokens"}, 503)
        try:
            check_token(auth[7:].strip(), sha, public_keys)
        except ModelTokenInvalid as exc:
            metrics.refused.labels(exc.reason).inc()
            return JSONResponse({"detail": str(exc)}, 403)
        pkg = await run_in_threadpool(store.get, sha)
        if pkg is None:
            metrics.refused.labels("not_found").inc()
            return JSONResponse({"detail": f"no stored package {sha}: the release's package was deleted; store it again"}, 404)
        size = pkg.archive_bytes
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{pkg.archive_sha256}"', "Content-Type": "application/x-tar"}
        try:
            rng = parse_range(request.headers.get("range"), size)
        except ValueError as exc:
            metrics.refused.labels("bad_range").inc()
            return JSONResponse({"detail": str(exc)}, 416, headers={"Content-Range": f"bytes */{size}"})
        start, end = rng if rng is not None else (0, size - 1)
        headers["Content-Length"] = str(end - start + 1 if size else 0)
        status = 206 if rng is not None else 200
        if rng is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if request.method == "HEAD" or size == 0:
            return Response(status_code=status, headers=headers)

        async def body() -> Any:
            async for chunk in iterate_in_threadpool(store.read(sha, start, end)):
                metrics.served.inc(len(chunk))
                yield chunk

        return StreamingResponse(body(), status_code=status, headers=headers)

    # A plain Starlette route: the login guard (an app-wide FastAPI dependency) does not apply; the model token does.
    r.add_route("/api/v1/models/{sha256}/archive", archive, methods=["GET", "HEAD"], include_in_schema=False)
    return r


def install(service: ControllerHost, signing_key: Path | None) -> None:
    """Add the model package routes to a controller; tokens are checked with ``signing_key``'s public half."""
    from fleet_controller.rollout.signing import load_private_key

    keys = [load_private_key(signing_key).public_key()] if signing_key is not None else []
    service.add_router(build_router(ModelStore(service.engine), keys, ModelApiMetrics(service.metrics_registry)))

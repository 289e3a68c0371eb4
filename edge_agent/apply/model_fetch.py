"""Model packages on a shop: fetch once over the uplink, verify, stage on the node, serve to the shop.

A desired state names its model package in ``model``: ``name``, ``sha256`` (the digest over the
package's files the release pins), ``archive_sha256`` and ``archive_bytes`` (the tar the
controller serves) and ``token`` (the model token that opens that one archive). Before the
applier applies a desired state, :meth:`ModelStager.ensure` makes sure the package is staged on
its node under ``<models dir>/<sha256>/``:

1. **already staged** (the digest of that directory matches): nothing is downloaded, so a
   rollback to the previous model costs no uplink at all;
2. else the archive is **downloaded** from the controller into ``.partial/<archive_sha256>.tar``,
   **resumable** (a ``Range`` request continues the partial file after a cut connection, a
   restart or a reboot) and **bandwidth-limited** (``rate_limit_bps``, the average over the
   download never above it, so a shop's uplink keeps room for its events);
3. the archive's sha256 is **verified before a byte of it is parsed**; a mismatch discards the
   file and refuses the desired state (``refused``, reason ``sha256_mismatch``): nothing is
   applied and the shop keeps running its current release;
4. it is extracted into a temporary directory (regular files only), the package digest is
   checked against ``sha256`` once more, and the directory is renamed into place, so a package
   directory exists only complete and verified. The verified archive is kept in
   ``.archives/`` for the other nodes of the shop (:class:`ShopModelServer`);
5. packages beyond ``keep`` are **pruned**, least recently used first, never the one the last
   applied release runs (``.applied``) nor the one being staged.

Vision pods mount ``<models dir>/<sha256>`` (the sha comes from their pod template's
``shopfleet.io/model-sha256`` annotation, so a new model restarts them). On a node other than
the applier, the pod's ``model-stage`` init container (:func:`stage_from_shop`,
``shopfleet model-stage``) copies the package from the applier's :class:`ShopModelServer` over
the shop network and verifies its digest; the uplink carries each model once per shop.

Everything here uses the standard library (``urllib``), so the agent image needs nothing more.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import logging
import os
import re
import shutil
import socketserver
import ssl
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

from edge_agent.apply.errors import ClusterUnavailable
from shopfleet.errors import PermanentError
from shopfleet.files import UnsafeArchive, extract_files

log = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
FAILURE_REASONS = (
    "connection", "server_error", "incomplete", "unauthorized", "not_found", "sha256_mismatch", "size_mismatch", "bad_archive",
    "not_stored", "no_source", "disk",
)
"""Values of the ``reason`` label of ``shopfleet_agent_model_fetch_failures_total``."""


class ModelsConfig(BaseModel):
    """The ``apply.models`` section: where model packages come from and how they are kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str | None = Field(None, description="Controller base URL the packages are downloaded from, e.g. https://controller.example:8080.")
    dir: Path = Field(Path("/var/lib/shopfleet/models"), description="Node-local directory of staged packages (<dir>/<sha256>/), mounted by the vision pods.")
    rate_limit_bps: int = Field(1_000_000, ge=0, description="Download bandwidth limit in bytes per second (average over a download); 0 = unlimited.")
    keep: int = Field(2, ge=2, description="Packages kept on the node (the running one, the previous one for rollback, ...); older ones are pruned.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of connecting and of each read; a timeout is retried like an unavailable cluster.")
    ca_file: Path | None = Field(None, description="CA bundle to verify an https source with (system CAs when unset).")
    serve_port: int = Field(0, ge=0, le=65535, description="Port the applier serves staged packages on to the shop's other nodes (the manifests use 9481); 0 = off.")


class ModelRejected(PermanentError):
    """A model package that must not be used (wrong digest, refused download): the desired state is refused."""


class ModelUnavailable(ClusterUnavailable):
    """The model source did not answer usefully (connection, 5xx, cut transfer): retried with the apply's
    backoff and deadline like an unavailable cluster API; the partial file is kept and resumed."""

    default_reason = "model_unavailable"


class ModelMetrics:
    """Metrics of model delivery, on the agent's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter("shopfleet_agent_model_bytes", "Model archive bytes downloaded (resumed downloads count only new bytes).", registry=registry)
        self.failures = Counter(
            "shopfleet_agent_model_fetch_failures", "Model fetches that failed, by reason (see docs/models.md).", ["reason"], registry=registry
        )
        self.staged = Counter("shopfleet_agent_model_staged", "Model packages verified and staged on this node.", registry=registry)
        self.packages = Gauge("shopfleet_agent_model_packages", "Model packages currently staged on this node.", registry=registry)


def package_digest(root: Path) -> str:
    """Return the package digest of directory ``root``: SHA-256 over each relative path and content, sorted.

    The same algorithm as the controller's ``model_package_digest`` (the agent never imports the
    controller; tests/edge_agent/test_model_fetch.py checks that the two agree).
    """
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise ModelRejected(f"package directory {root} is empty", reason="bad_archive")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RateLimiter:
    """Keep the average rate since ``start()`` at or below ``rate`` bytes/s by sleeping after each chunk."""

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._t0 = clock()
        self._sent = 0

    def start(self) -> None:
        """Start a new measuring window (one HTTP request)."""
        self._t0 = self._clock()
        self._sent = 0

    def consume(self, n: int) -> None:
        """Account ``n`` bytes just received; sleep until the average is back at the limit."""
        if self.rate <= 0:
            return
        self._sent += n
        ahead = self._t0 + self._sent / self.rate - self._clock()
        if ahead > 0:
            self._sleep(ahead)

    @property
    def chunk(self) -> int:
        """Return the read size: small enough that the limit is smooth, large enough to be cheap."""
        return 65536 if self.rate <= 0 else max(1024, min(65536, self.rate // 8))


def download(
    url: str,
    dest: Path,
    total: int,
    *,
    headers: Mapping[str, str] | None = None,
    limiter: RateLimiter | None = None,
    timeout_s: float = 30.0,
    context: ssl.SSLContext | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Bring ``dest`` to ``total`` bytes from ``url``, continuing what ``dest`` already holds (``Range``).

    Raises ``ModelUnavailable`` for anything worth retrying (the bytes received so far stay in
    ``dest``) and ``ModelRejected`` for a refusal (401/403/404) or a size that cannot be right.
    """
    limiter = limiter or RateLimiter(0)
    have = dest.stat().st_size if dest.exists() else 0
    if have > total:
        dest.unlink()
        have = 0
    if have == total:
        return
    req = urllib.request.Request(url, headers={**(headers or {}), "Range": f"bytes={have}-"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s, context=context)
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode(errors="replace")
        if exc.code == 416:  # our partial file is not a prefix the source knows: start over
            dest.unlink(missing_ok=True)
            raise ModelUnavailable(f"{url}: range {have}- refused (416); the partial file was discarded, the next attempt starts over",
                                   reason="incomplete", status=416) from None
        if exc.code in (401, 403):
            raise ModelRejected(f"{url}: the source refused the model token ({exc.code}: {detail})", reason="unauthorized") from None
        if exc.code == 404:
            raise ModelRejected(f"{url}: no such package at the source (404: {detail})", reason="not_found") from None
        retry_after = exc.headers.get("Retry-After") if exc.headers else None
        raise ModelUnavailable(f"{url}: HTTP {exc.code}: {detail}", reason="server_error", status=exc.code,
                               retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise ModelUnavailable(f"{url}: {getattr(exc, 'reason', exc)}", reason="connection") from None
    with resp:
        mode = "ab"
        if resp.status == 200:  # the source ignored the range: it sends everything from byte 0
            mode, have = "wb", 0
        elif resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                dest.unlink(missing_ok=True)
                raise ModelUnavailable(f"{url}: answered a range other than bytes={have}- ; starting over", reason="incomplete")
        limiter.start()
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(dest, mode) as f:
                while True:
                    chunk = resp.read(limiter.chunk)
                    if not chunk:
                        break
                    have += len(chunk)
                    if have > total:
                        f.close()
                        dest.unlink(missing_ok=True)
                        raise ModelRejected(f"{url}: more than the {total} bytes the desired state names; the file was discarded",
                                            reason="size_mismatch")
                    f.write(chunk)
                    on_bytes(len(chunk))
                    limiter.consume(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise ModelUnavailable(f"{url}: transfer cut at {have} of {total} bytes ({exc.__class__.__name__}); the next attempt resumes there",
                                   reason="incomplete") from None
    if have < total:
        raise ModelUnavailable(f"{url}: connection closed at {have} of {total} bytes; the next attempt resumes there", reason="incomplete")


def _extract(archive: Path, dest: Path, limit_bytes: int) -> None:
    """Extract a package archive into ``dest``: regular files with relative names, at most ``limit_bytes``."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
            if any(not (m.isfile() or m.isdir()) for m in members) or sum(m.size for m in members) > limit_bytes:
                raise ModelRejected(f"{archive} holds something other than package files", reason="bad_archive")
            extract_files(tar, dest)
    except UnsafeArchive as exc:
        raise ModelRejected(f"{archive} names a path outside the package ({exc})", reason="bad_archive") from None
    except (tarfile.TarError, OSError) as exc:
        raise ModelRejected(f"{archive} is not a readable package archive ({exc})", reason="bad_archive") from None
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # vision pods run under their own uid and read only


class ModelStager:
    """Stage model packages in one node-local directory (see the module docstring)."""

    def __init__(self, config: ModelsConfig, metrics: ModelMetrics, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.dir = config.dir
        self._metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._context = ssl.create_default_context(cafile=str(config.ca_file)) if config.ca_file else None
        metrics.packages.set(len(self.staged()))

    def path(self, sha256: str) -> Path:
        """Return where package ``sha256`` lives when staged."""
        return self.dir / sha256

    def staged(self) -> list[str]:
        """Return the staged package digests, most recently used first."""
        if not self.dir.is_dir():
            return []
        dirs = [p for p in self.dir.iterdir() if p.is_dir() and SHA_RE.match(p.name)]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def is_staged(self, sha256: str) -> bool:
        """Return whether a complete, verified copy of ``sha256`` is on this node (re-hashed: disks rot)."""
        p = self.path(sha256)
        try:
            return p.is_dir() and package_digest(p) == sha256
        except ModelRejected:
            return False  # e.g. an empty directory the kubelet created for a pod's subPath

    @property
    def applied(self) -> str | None:
        """Return the digest of the package the last applied desired state runs."""
        try:
            text = (self.dir / ".applied").read_text().strip()
        except OSError:
            return None
        return text if SHA_RE.match(text) else None

    def ensure(self, model: Mapping[str, Any]) -> Path:
        """Stage the package ``model`` names (download, verify, extract) unless it is; return its directory."""
        with self._lock:
            try:
                return self._ensure(model)
            except (ModelRejected, ModelUnavailable) as exc:
                self._metrics.failures.labels(exc.reason or "connection").inc()
                raise
            except OSError as exc:  # our own disk: full, read-only, permissions
                self._metrics.failures.labels("disk").inc()
                raise ModelRejected(f"cannot stage the model under {self.dir}: {exc}", reason="disk") from None

    def _ensure(self, model: Mapping[str, Any]) -> Path:
        sha = str(model.get("sha256", ""))
        name = str(model.get("name", "?"))
        if not SHA_RE.match(sha):
            raise ModelRejected(f"the desired state's model has no valid sha256 ({sha!r})", reason="bad_archive")
        target = self.path(sha)
        if self.is_staged(sha):
            os.utime(target)  # most recently used: pruned last
            return target
        archive_sha = model.get("archive_sha256")
        total = int(model.get("archive_bytes") or 0)
        if not archive_sha or not SHA_RE.match(str(archive_sha)) or total <= 0:
            raise ModelRejected(f"model {name} ({sha[:16]}...) is not stored on the controller, so no shop can download it: "
                                "create the release with 'shopfleet release create --model DIR'", reason="not_stored")
        if not self.config.source:
            raise ModelRejected(f"model {name} is not staged on this node and apply.models.source is not set: set it to the controller's URL",
                                reason="no_source")
        partial_dir = self.dir / ".partial"
        partial = partial_dir / f"{archive_sha}.tar"
        if partial_dir.is_dir():
            for stale in partial_dir.iterdir():
                if stale != partial:
                    stale.unlink(missing_ok=True)  # one download at a time: an older release's partial is useless now
        url = f"{self.config.source.rstrip('/')}/api/v1/models/{sha}/archive"
        headers = {"Authorization": f"Bearer {model.get('token', '')}"}
        log.info("fetching model %s (%s, %d bytes) from %s at up to %s B/s", name, sha[:16], total, url, self.config.rate_limit_bps or "unlimited")
        download(url, partial, total, headers=headers, limiter=RateLimiter(self.config.rate_limit_bps, self._clock, self._sleep),
                 timeout_s=self.config.timeout_s, context=self._context, on_bytes=self._metrics.bytes.inc)
        return self._install(partial, sha, str(archive_sha), name, limit_bytes=total)

    def _install(self, archive: Path, sha: str, archive_sha: str | None, name: str, limit_bytes: int) -> Path:
        """Verify ``archive`` (by its own sha256 when known, then the package digest), extract it, rename it into place."""
        if archive_sha is not None:
            got = sha256_file(archive)
            if got != archive_sha:
                archive.unlink(missing_ok=True)
                raise ModelRejected(f"model {name}: the downloaded archive's sha256 is {got[:16]}..., the signed desired state says "
                                    f"{archive_sha[:16]}...; the file was discarded and nothing was applied", reason="sha256_mismatch")
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{sha[:12]}-", dir=self.dir))
        try:
            _extract(archive, staging, limit_bytes)
            got = package_digest(staging)
            if got != sha:
                archive.unlink(missing_ok=True)
                raise ModelRejected(f"model {name}: the package's digest is {got[:16]}..., the release pins {sha[:16]}...; "
                                    "the file was discarded and nothing was applied", reason="sha256_mismatch")
            staging.chmod(0o755)
            target = self.path(sha)
            if target.exists():  # a leftover (e.g. an empty subPath dir the kubelet made): never a verified copy, see is_staged
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        archives = self.dir / ".archives"
        archives.mkdir(exist_ok=True)
        archive.replace(archives / f"{sha}.tar")  # kept for the shop's other nodes (ShopModelServer)
        self._metrics.staged.inc()
        self._prune(keep_also={sha})
        log.info("model %s (%s) verified and staged in %s", name, sha[:16], target)
        return target

    def mark_applied(self, model: Mapping[str, Any] | None) -> None:
        """Record that the desired state naming ``model`` is applied: its package is never pruned."""
        if not model or not SHA_RE.match(str(model.get("sha256", ""))):
            return
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / ".applied.tmp"
            tmp.write_text(str(model["sha256"]) + "\n")
            tmp.replace(self.dir / ".applied")

    def _prune(self, keep_also: set[str]) -> None:
        protected = keep_also | ({self.applied} if self.applied else set())
        kept = 0
        for sha in self.staged():
            if sha in protected or kept < self.config.keep - len(protected):
                kept += sha not in protected
                continue
            log.info("pruning model package %s (keep = %d)", sha[:16], self.config.keep)
            shutil.rmtree(self.path(sha), ignore_errors=True)
            (self.dir / ".archives" / f"{sha}.tar").unlink(missing_ok=True)
        self._metrics.packages.set(len(self.staged()))


# ----- the shop's other nodes ------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serve ``GET /models/<sha256>.tar`` from the archives directory, with single byte ranges."""

    archives: Path

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("model server: " + fmt, *args)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        m = re.match(r"^/models/([0-9a-f]{64})\.tar$", self.path)
        f = self.archives / f"{m.group(1)}.tar" if m else None
        if f is None or not f.is_file():
            self.send_error(404, "no such staged package")
            return
        size = f.stat().st_size
        start, status = 0, 200
        rng = RANGE_RE.match(self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            if start >= size and size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            return
        with open(f, "rb") as fh:
            fh.seek(start)
            shutil.copyfileobj(fh, self.wfile, 1 << 16)


class ShopModelServer:
    """Serve the staged, verified archives to the shop's other nodes (read-only, content-addressed).

    No authentication: it serves only packages whose digest the receiver checks against its pod's
    annotation, and only on the shop network, where the shop's desired state already travels.
    """

    def __init__(self, archives: Path, port: int, host: str = "0.0.0.0") -> None:
        handler = type("ModelHandler", (_Handler,), {"archives": archives})
        self._server = socketserver.ThreadingTCPServer((host, port), handler, bind_and_activate=False)
        self._server.allow_reuse_address = True
        self._server.daemon_threads = True
        self._server.server_bind()
        self._server.server_activate()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="model-server", daemon=True)

    def start(self) -> ShopModelServer:
        """Start serving in a daemon thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


def stage_from_shop(source: str, sha256: str, models_dir: Path, *, timeout_s: float = 30.0, attempts: int = 5,
                    sleep: Callable[[float], None] = time.sleep) -> Path:
    """Stage package ``sha256`` into ``models_dir`` from the applier's :class:`ShopModelServer` unless it is there.

    What a vision pod's init container runs on each node. The package digest is checked before
    the directory is renamed into place; a partial download resumes across attempts.
    """
    if not SHA_RE.match(sha256):
        raise ModelRejected(f"--sha256 {sha256!r} is not a package digest: the pod template lacks the shopfleet.io/model-sha256 annotation "
                            "(a release without a model?)", reason="bad_archive")
    stager = ModelStager(ModelsConfig(dir=models_dir, rate_limit_bps=0, timeout_s=timeout_s), ModelMetrics(CollectorRegistry()))
    if stager.is_staged(sha256):
        return stager.path(sha256)
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = models_dir / ".partial" / f"{sha256}.from-shop.tar"
    url = f"{source.rstrip('/')}/models/{sha256}.tar"
    for attempt in range(1, attempts + 1):
        try:
            total = _remote_size(url, timeout_s)
            download(url, partial, total, timeout_s=timeout_s)
            break
        except ModelUnavailable as exc:
            if attempt == attempts:
                raise
            log.warning("model-stage: %s; attempt %d of %d in %ds", exc, attempt + 1, attempts, 2 ** attempt)
            sleep(2 ** attempt)
    return stager._install(partial, sha256, None, sha256[:16], limit_bytes=partial.stat().st_size * 2 + (1 << 20))


def _remote_size(url: str, timeout_s: float) -> int:
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.headers.get("Content-Length", "0"))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise ModelRejected(f"{url}: the applier has not staged this package (404): is the applier's apply.models.source set?",
                                reason="not_found") from None
        raise ModelUnavailable(f"{url}: HTTP {exc.code}", reason="server_error", status=exc.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise ModelUnavailable(f"{url}: {getattr(exc, 'reason', exc)}", reason="connection") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``model-stage`` subcommand (what the vision pods' init container runs)."""
    p = sub.add_parser(
        "model-stage",
        help="copy a model package from the shop's applier onto this node and verify it (vision pods' init container)",
        description="Stage model package SHA256 under DIR/SHA256 from the applier's model server, unless a verified copy is there. "
                    "The package digest is checked before the directory appears. Exit 0 staged, 1 failed.",
        epilog="See docs/models.md.",
    )
    p.add_argument("--source", required=True, metavar="URL", help="the applier's model server, e.g. http://shopfleet-models.shopfleet.svc:9481")
    p.add_argument("--sha256", required=True, help="package digest (the pod's shopfleet.io/model-sha256 annotation)")
    p.add_argument("--dir", type=Path, default=Path("/var/lib/shopfleet/models"), help="node-local models directory (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="timeout of one request in seconds (default: %(default)s)")
    p.set_defaults(func=_model_stage)


def _model_stage(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        path = stage_from_shop(args.source, args.sha256, args.dir, timeout_s=args.timeout)
    except (ModelRejected, ModelUnavailable) as exc:
        print(f"shopfleet model-stage: {exc}", flush=True)
        return 1
    print(f"model {args.sha256[:16]}... staged in {path}", flush=True)
    return 0

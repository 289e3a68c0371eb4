"""What the enrollment tests share: the controller app with the guard and the enrollment routes, served by uvicorn (HTTPS or not)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from fleet_controller.enrollment import NodeCredentials
from fleet_controller.intake.core import RegistryWriter
from fleet_controller.pki import Pki
from fleet_controller.registry import migrations
from fleet_controller.registry.audit import AuditLog
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.read import RegistryReader
from fleet_controller.settings import ApiSettings, EnrollmentSettings
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.app import create_app
from fleet_controller.web.enrollment_api import EnrollmentMetrics, enrollment_router, node_revoker
from tests.support.wait import wait_for

ADMIN_PASSWORD = "admin-test-password"
VIEWER_PASSWORD = "viewer-test-password"


@dataclass
class EnrollmentApp:
    """The app and what it is made of."""

    app: FastAPI
    engine: Engine
    store: AccountStore
    creds: NodeCredentials | None
    registry: CollectorRegistry
    admin_token: str
    viewer_token: str

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.engine)


def migrated_engine(tmp_path: Path) -> Engine:
    """Return an engine on a fresh, migrated SQLite database in ``tmp_path``."""
    engine = create_engine(f"sqlite:///{tmp_path / 'controller.db'}")
    migrations.upgrade(engine)
    return engine


def enrollment_app(tmp_path: Path, settings: EnrollmentSettings | None) -> EnrollmentApp:
    """Return the controller app (guard, logins, enrollment routes) on a new database; an admin and a viewer token."""
    engine = migrated_engine(tmp_path)
    registry = CollectorRegistry()
    store = AccountStore(engine)
    store.add_user("admin", ADMIN_PASSWORD, "admin")
    store.add_user("viewer", VIEWER_PASSWORD, "viewer")
    auth = build_auth(store, registry)
    metrics = EnrollmentMetrics(registry)
    creds = None
    if settings is not None:
        creds = NodeCredentials(settings, engine, on_reload=lambda result: metrics.reloads.labels(result.split(":")[0]).inc())
    router = enrollment_router(creds, AuditLog(engine), metrics,
                               max_failures=settings.max_failures_per_address if settings else 10,
                               allow_plain_http=settings.allow_plain_http if settings else False)
    # The registry writer and the revoker serve DELETE /api/v1/shops/{shop}/nodes/{node} (revoke, then remove), as in the controller.
    writer = RegistryWriter(engine.url.render_as_string(hide_password=False), mode="thread")
    app = create_app(RegistryReader(engine), registry, writer=writer, routers=[auth.router, router], dependencies=[auth.dependency],
                     state={"revoke_node": node_revoker(creds, metrics)})
    return EnrollmentApp(app, engine, store, creds, registry, store.create_token("admin", "t"), store.create_token("viewer", "t"))


def server_pki(root: Path) -> Pki:
    """Return a fleet CA in ``root`` with a server certificate for localhost/127.0.0.1 (the controller's HTTPS)."""
    pki = Pki(root) if (root / "ca.crt").exists() else Pki.init(root)
    if pki.current("localhost") is None:
        pki.issue("server", "localhost", sans=["127.0.0.1"])
    return pki


def https_api(pki: Pki) -> ApiSettings:
    """Return API settings serving HTTPS with the PKI's ``localhost`` certificate."""
    return ApiSettings(tls_cert_file=pki.cert_path("localhost"), tls_key_file=pki.key_path("localhost"))


@contextmanager
def serve(app: FastAPI, api: ApiSettings) -> Iterator[int]:
    """Serve ``app`` with uvicorn on a free port of 127.0.0.1 in a thread (HTTPS if ``api`` says so); yield the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **api.uvicorn_options()))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started, 15, "uvicorn started")
        yield port
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()

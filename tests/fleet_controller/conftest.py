"""Fixtures of the controller tests: a migrated registry on each engine, the API client, message builders.

Every API test goes through the one ``api_client`` fixture, so when authentication is added to
the app only this fixture has to learn to log in.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edge_agent.protocol import encode
from fleet_controller.alerts.rules import AlertRules
from fleet_controller.intake.core import RegistryWriter
from fleet_controller.metrics import ControllerMetrics
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.read import RegistryReader
from fleet_controller.registry.store import RegistryStore
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.app import create_app
from fleet_controller.web.dashboard.setup import build_app
from tests.support.controller import (
    FACTS,
    FAST,
    ROLE_USERS,
    Node,
    RunningController,
    alert,
    controller_settings,
    event,
    heartbeat,
    presence,
    role_users,
    telemetry,
)
from tests.support.wait import wait_for


@pytest.fixture
def registry(db_url) -> Iterator[RegistryStore]:
    """The registry's write side on a freshly migrated database of each engine (tests write directly, as the writer)."""
    engine = create_engine(db_url)
    upgrade(engine)
    yield RegistryStore(engine)
    engine.dispose()


@pytest.fixture
def reader(registry) -> RegistryReader:
    """The typed read side of the same registry."""
    return RegistryReader(registry.engine)


@pytest.fixture
def metrics() -> ControllerMetrics:
    """Controller metrics on a private Prometheus registry."""
    return ControllerMetrics(CollectorRegistry())


@pytest.fixture
def api_client(registry, reader, metrics, db_url) -> Iterator[TestClient]:
    """An HTTP client of the API app over the real registry and a writer on it (the single place to add auth later)."""
    metrics.watch_presence(reader.presence_counts)
    # Every route is guarded (fleet_controller.web.accounts.web): the client acts as an admin via an API token.
    from argon2 import PasswordHasher

    from fleet_controller.web.accounts.store import AccountStore
    from fleet_controller.web.accounts.web import build_auth

    store = AccountStore(registry.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    store.add_user("test-admin", "test-admin-password", "admin")
    auth = build_auth(store, metrics.registry)
    writer = RegistryWriter(db_url, mode="thread")
    app = create_app(reader, metrics.registry, writer=writer, health=lambda: {"status": "ok"}, routers=[auth.router],
                     dependencies=[auth.dependency])
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {store.create_token('test-admin', 'api-tests')}"
        yield client
    writer.close()


__all__ = ["FACTS", "ROLE_USERS", "Node", "RunningController", "alert", "controller_settings", "encode", "event",
           "heartbeat", "presence", "role_users", "telemetry", "wait_for"]


@pytest.fixture
def controller(broker, tmp_path) -> Iterator[RunningController]:
    """A controller on this test's own broker and SQLite database, running in a background thread."""
    rc = RunningController(controller_settings(broker, tmp_path))
    yield rc
    rc.stop()


@pytest.fixture
def web(registry):
    """The dashboard app on the test registry, one login per role: (app, {user: password}, live hub)."""
    store = AccountStore(registry.engine, FAST)
    creds = role_users(store)
    mreg = CollectorRegistry()
    app, hub = build_app(RegistryReader(registry.engine), mreg, store, AlertRules())
    return app, creds, hub

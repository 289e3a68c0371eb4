"""Fixtures of the controller tests: a migrated registry on each engine, the API client, message builders.

Every API test goes through the one ``api_client`` fixture, so when authentication is added to
the app only this fixture has to learn to log in.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edge_agent.protocol import (
    Alert,
    Event,
    Heartbeat,
    NodeFacts,
    Presence,
    Reading,
    Telemetry,
    encode,
)
from edge_agent.protocol import Topics as Topic
from fleet_controller.intake.core import RegistryWriter
from fleet_controller.metrics import ControllerMetrics
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.read import RegistryReader
from fleet_controller.registry.store import RegistryStore
from fleet_controller.web.app import create_app
from tests.support.wait import wait_for

FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.2, mem_total_bytes=4 << 30,
                  mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30, agent_version="0.1.0")


def heartbeat(shop: str = "shop-a", node: str = "pi-1", seq: int = 1, epoch: str = "ep1", interval: float = 10.0, **kw) -> Heartbeat:
    """Return a valid heartbeat."""
    return Heartbeat(shop=shop, node=node, seq=seq, epoch=epoch, interval_s=interval, facts=kw.pop("facts", FACTS), **kw)


def telemetry(shop: str = "shop-a", node: str = "pi-1", seq: int = 1, epoch: str = "ep1", value: float = 1.0, ts: float | None = None) -> Telemetry:
    """Return a telemetry message with one fridge temperature reading."""
    extra = {} if ts is None else {"ts": ts}
    return Telemetry(shop=shop, node=node, seq=seq, epoch=epoch, readings=(Reading(name="temperature_c", value=value, unit="C", source="fridge-1"),), **extra)


def event(shop: str = "shop-a", node: str = "pi-1", seq: int = 1, epoch: str = "ep1", type: str = "door_opened") -> Event:
    """Return a shop event."""
    return Event(shop=shop, node=node, seq=seq, epoch=epoch, type=type, source="door-1", data={"n": seq})


def alert(shop: str = "shop-a", node: str = "pi-1", seq: int = 1, epoch: str = "ep1", state: str = "firing") -> Alert:
    """Return a node alert."""
    return Alert(shop=shop, node=node, seq=seq, epoch=epoch, name="fridge_warm", state=state, severity="critical", message="7.5 C")


def presence(shop: str = "shop-a", node: str = "pi-1", state: str = "online", session: int = 1) -> Presence:
    """Return a birth or Will."""
    return Presence(shop=shop, node=node, state=state, session=session)


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


ROLE_USERS = {"viewer": "viewer", "operator": "operator", "mlops": "ml-engineer", "admin": "admin"}
"""One test user per role: username -> role."""


def role_users(store) -> dict[str, str]:
    """Create (or reset) one user per role in an ``AccountStore``; return ``{username: password}``."""
    creds = {user: f"{user}-test-pass" for user in ROLE_USERS}
    for user, role in ROLE_USERS.items():
        store.put_user(user, creds[user], role)
    return creds


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


__all__ = ["ROLE_USERS", "alert", "encode", "event", "heartbeat", "presence", "role_users", "telemetry", "wait_for"]


# ----- a controller running in a background thread (for sync tests and hypothesis) -----------------

import asyncio  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402

import paho.mqtt.client as paho  # noqa: E402

from fleet_controller.service import ControllerService  # noqa: E402
from fleet_controller.settings import ControllerSettings, load_settings  # noqa: E402


class RunningController:
    """A :class:`ControllerService` on its own event loop thread; ``stop()`` shuts it down."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = ControllerService(settings)
        self.call(self.service.start())

    def call(self, coro, timeout: float = 60):
        """Run ``coro`` on the controller's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def metric(self, name: str, **labels) -> float:
        """Return the current value of a controller metric sample (0 when absent)."""
        return self.service.metrics_registry.get_sample_value(name, labels) or 0.0

    def stop(self) -> None:
        """Stop the service and its loop thread (again is a no-op)."""
        if self.loop.is_closed():
            return
        self.call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def controller_settings(mqtt_broker, tmp_path, **over) -> ControllerSettings:
    """Return settings for a controller on ``mqtt_broker`` with SQLite under ``tmp_path`` and a free API port."""
    base = {"data_dir": str(tmp_path / "ctl"), "broker": {"port": mqtt_broker.port}, "api": {"port": 0},
            "presence": {"sweep_interval_s": 0.2}, "clock_interval_s": 0.5}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_settings(None, base, environ={})


@pytest.fixture
def controller(broker, tmp_path) -> Iterator[RunningController]:
    """A controller on this test's own broker and SQLite database, running in a background thread."""
    rc = RunningController(controller_settings(broker, tmp_path))
    yield rc
    rc.stop()


class Node:
    """A paho client that speaks for one node (QoS 1 publishes; optional Will)."""

    def __init__(self, broker, shop: str = "shop-a", node: str = "pi-1", *, session: int = 1, will: bool = True) -> None:
        self.shop, self.node = shop, node
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{shop}.{node}.{uuid.uuid4().hex[:6]}")
        if will:
            self.c.will_set(Topic.node(shop, node, "presence"), encode(presence(shop, node, "offline", session)), qos=1, retain=True)
        self.c.connect("127.0.0.1", broker.port, keepalive=5)
        self.c.loop_start()

    def send(self, msg, topic: str | None = None, *, retain: bool = False) -> None:
        """Publish a message (or raw bytes on ``topic``) and wait for the broker's ack."""
        if topic is None:
            channel = {"heartbeat": "telemetry", "telemetry": "telemetry", "event": "events", "alert": "events",
                       "presence": "presence", "command_result": "replies"}[msg.kind]
            topic = Topic.node(self.shop, self.node, channel)
        payload = msg if isinstance(msg, bytes) else encode(msg)
        self.c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash would (the broker sends the Will)."""
        self.c.loop_stop()
        self.c.socket().close()

    def close(self) -> None:
        """Disconnect cleanly."""
        self.c.disconnect()
        self.c.loop_stop()


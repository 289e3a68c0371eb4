"""What the controller tests share: message builders, test users, a controller on a thread, a fake node.

Test modules of any package (the controller's, the browser tests, the end-to-end tests) import
these from here, never from another test module or conftest.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import paho.mqtt.client as paho
from argon2 import PasswordHasher

from edge_agent.protocol import (
    Alert,
    Event,
    Heartbeat,
    NodeFacts,
    Presence,
    Reading,
    Telemetry,
    Topics,
    encode,
)
from edge_agent.protocol import Topics as Topic
from fleet_controller.intake.mqtt import InboundMessage
from fleet_controller.registry.store import NodeUpdate, SeqCursor, WriteBatch
from fleet_controller.service import ControllerService
from fleet_controller.settings import ControllerSettings, load_settings
from tests.support.loop import LoopThread

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


ROLE_USERS = {"viewer": "viewer", "operator": "operator", "mlops": "ml-engineer", "admin": "admin"}
"""One test user per role: username -> role."""


def role_users(store: Any) -> dict[str, str]:
    """Create (or reset) one user per role in an ``AccountStore``; return ``{username: password}``."""
    creds = {user: f"{user}-test-pass" for user in ROLE_USERS}
    for user, role in ROLE_USERS.items():
        store.put_user(user, creds[user], role)
    return creds


class RunningController(LoopThread[ControllerService]):
    """A :class:`ControllerService` on its own event loop thread; ``stop()`` shuts it down."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        super().__init__(ControllerService(settings))

    def metric(self, name: str, **labels) -> float:
        """Return the current value of a controller metric sample (0 when absent)."""
        return self.service.metrics_registry.get_sample_value(name, labels) or 0.0


def controller_settings(mqtt_broker, tmp_path, **over) -> ControllerSettings:
    """Return settings for a controller on ``mqtt_broker`` with SQLite under ``tmp_path`` and a free API port."""
    base = {"data_dir": str(tmp_path / "ctl"), "broker": {"port": mqtt_broker.port}, "api": {"port": 0},
            "presence": {"sweep_interval_s": 0.2}, "clock_interval_s": 0.5}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_settings(None, base, environ={})


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


T0 = 1_800_000_000.0
"""The registry tests' clock: messages are received at this time unless a test says otherwise."""


def batch(*msgs: Any, at: float = T0) -> WriteBatch:
    """Return a writer batch of ``msgs`` as the intake would build it (one message each per node)."""
    wb = WriteBatch()
    for m in msgs:
        if m.kind == "presence":
            wb.presences.append((m, at))
        else:
            wb.uplinks.append((m, at))
            key = (m.shop, m.node)
            wb.nodes[key] = NodeUpdate(SeqCursor(m.epoch, m.seq), messages=1)
        wb.seen[(m.shop, m.node)] = at
    return wb


FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
"""Password hashing cheap enough for tests (the production cost is the library's default)."""


def login(client: httpx.Client, username: str, password: str, next_url: str = "/fleet") -> Any:
    """Log ``client`` (a TestClient, or httpx on a live API) in through the real form with its CSRF token; return the response."""
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token, "next": next_url},
                       follow_redirects=False)


def csrf_of(client: httpx.Client) -> str:
    """Return the CSRF token the dashboard put in its page for this session."""
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/fleet").text).group(1)


def inbound(msg: Any, topic: str | None = None) -> InboundMessage:
    """Return ``msg`` (a message, or raw bytes with ``topic``) as the intake receives it from the broker."""
    if topic is None:
        channel = {"heartbeat": "telemetry", "telemetry": "telemetry", "event": "events", "alert": "events", "presence": "presence"}[msg.kind]
        topic = Topics.node(msg.shop, msg.node, channel)
    return InboundMessage(topic=topic, payload=encode(msg) if not isinstance(msg, bytes) else msg)


def value(metrics: Any, name: str, **labels: str) -> float:
    """Return a controller metric sample (0 when absent)."""
    return metrics.registry.get_sample_value(name, labels) or 0.0

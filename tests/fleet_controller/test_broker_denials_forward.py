"""broker-denials' summary, posted over HTTP with a security-ingest token, opens an alert on the node's shop.

The controller side is the real receiver (``POST /api/v1/security-events`` behind the real token
guard, served by uvicorn on loopback) on the registry fixture's database; the sidecar side is the
real :class:`ControllerReporter` fed by a :class:`DenialWatcher` reading Mosquitto 2.0.11's lines.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import uvicorn
from argon2 import PasswordHasher
from prometheus_client import CollectorRegistry

from fleet_controller.alerts import store
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.broker_denials import ControllerReporter, DenialMetrics, DenialWatcher
from fleet_controller.registry.bus import EventBus
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.accounts.roles import Role
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.alerts_pages import alerts_router
from fleet_controller.web.app import create_app
from fleet_controller.web.security_events import SecurityEventMetrics, security_events_router
from shopfleet.broker import free_port
from tests.support.controller import batch, heartbeat, presence
from tests.support.wait import wait_for

NOW = 1_800_000_000.0


@pytest.fixture
def controller(registry):
    accounts = AccountStore(registry.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    accounts.put_user("broker-denials", "broker-denials-test-pass", Role.SECURITY_INGEST)
    accounts.put_user("viewer", "viewer-test-pass-1", Role.VIEWER)
    mreg = CollectorRegistry()
    auth = build_auth(accounts, mreg)
    host = SimpleNamespace(engine=registry.engine, bus=EventBus(), reader=RegistryReader(registry.engine))
    app = create_app(host.reader, mreg, dependencies=[auth.dependency], routers=[
        auth.router, security_events_router(host, SecurityEventMetrics(mreg), clock=lambda: NOW), alerts_router(host, AlertMetrics(CollectorRegistry()))])
    for shop, node in (("shop-a", "pi-1"), ("shop-b", "pi-1")):
        registry.write_batch(batch(presence(shop=shop, node=node), heartbeat(shop=shop, node=node, seq=1), at=NOW), NOW)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    wait_for(lambda: server.started, timeout=20, what="uvicorn to start")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", engine=registry.engine, mreg=mreg,
                              ingest=accounts.create_token("broker-denials", "shop-a"), viewer=accounts.create_token("viewer", "t"))
    finally:
        server.should_exit = True
        t.join(10)


def _watch(reporter: ControllerReporter, metrics: DenialMetrics) -> DenialWatcher:
    watcher = DenialWatcher(metrics, report=reporter, summary_interval_s=3600, clock=lambda: NOW)
    watcher.feed("1800000000: New client connected from 10.1.2.3:4455 as shop-a.pi-1 (p2, c1, k30, u'shop-a.pi-1').")
    for _ in range(3):
        watcher.feed("1800000000: Denied PUBLISH from shop-a.pi-1 (d0, q1, r0, m1, 'fleet/v1/shop-b/pi-1/telemetry', ... (6 bytes))")
    return watcher


def test_summary_opens_an_alert_for_the_publishing_node(controller):
    metrics = DenialMetrics()
    watcher = _watch(ControllerReporter(controller.url + "/api/v1/security-events", controller.ingest, metrics), metrics)
    watcher.flush(force=True)
    assert metrics.registry.get_sample_value("shopfleet_broker_denial_reports_total", {"outcome": "sent"}) == 1
    [a] = store.list_alerts(controller.engine, NOW)
    assert (a.rule, a.shop, a.node, a.severity) == ("security:mqtt_publish_denied", "shop-a", "pi-1", "warning")
    assert "3 publish(es) by shop-a.pi-1" in a.details


def test_a_token_without_security_ingest_is_refused_and_counted(controller):
    metrics = DenialMetrics()
    watcher = _watch(ControllerReporter(controller.url + "/api/v1/security-events", controller.viewer, metrics), metrics)
    watcher.flush(force=True)
    assert metrics.registry.get_sample_value("shopfleet_broker_denial_reports_total", {"outcome": "failed"}) == 1
    assert store.list_alerts(controller.engine, NOW) == []

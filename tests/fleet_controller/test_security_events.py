"""POST /api/v1/security-events: FalcoSidekick's webhook JSON becomes an alert, through the real guard.

Runs on SQLite and PostgreSQL (the ``registry`` fixture), with one bearer token per role plus a
``security-ingest`` machine account; hostile bodies get a 4xx naming the problem and are counted.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from fleet_controller.alerts import store
from fleet_controller.alerts.evaluator import Firing, alert_key
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.registry.bus import EventBus
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.accounts.roles import (
    Permission,
    Role,
    has_permission,
    required_permission,
)
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.alerts_pages import alerts_router
from fleet_controller.web.app import create_app
from fleet_controller.web.security_events import (
    MAX_BODY_BYTES,
    SecurityEventMetrics,
    security_events_router,
)
from tests.support.controller import ROLE_USERS, batch, heartbeat, presence, role_users

NOW = 1_800_000_000.0
URL = "/api/v1/security-events"


def falco(rule: str = "Shell in shopfleet vision container", priority: str = "Warning", hostname: str = "pi-1", **fields) -> dict:
    """One event as FalcoSidekick posts it (its extra keys included)."""
    return {
        "uuid": "0a6f7b2e-1c1e-4b59-9f3e-1b7a3a1d2c3d",
        "output": "20:31:02.123: Warning Shell in vision container (user=root shell=sh pod=vision-abc container=vision)",
        "priority": priority,
        "rule": rule,
        "time": "2027-01-15T08:00:00.123456789Z",
        "source": "syscall",
        "tags": ["shopfleet", "shell"],
        "hostname": hostname,
        "output_fields": {"k8s.ns.name": "shopfleet", "k8s.pod.name": "vision-abc", "container.name": "vision",
                          "proc.cmdline": "sh -c id", "evt.time": 1800000000123456789, **fields},
    }


@pytest.fixture
def api(registry):
    accounts = AccountStore(registry.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    role_users(accounts)
    accounts.put_user("falco-sidekick", "falco-sidekick-test-pass", Role.SECURITY_INGEST)
    mreg = CollectorRegistry()
    metrics = SecurityEventMetrics(mreg)
    auth = build_auth(accounts, mreg)
    bus = EventBus()
    reader = RegistryReader(registry.engine)
    host = SimpleNamespace(engine=registry.engine, bus=bus, reader=reader)
    app = create_app(reader, mreg, dependencies=[auth.dependency], routers=[
        auth.router, security_events_router(host, metrics, clock=lambda: NOW + 60), alerts_router(host, AlertMetrics(CollectorRegistry()))])
    # shop-a and shop-b both have a pi-1; only shop-a has pi-2
    for shop, node in (("shop-a", "pi-1"), ("shop-b", "pi-1"), ("shop-a", "pi-2")):
        registry.write_batch(batch(presence(shop=shop, node=node), heartbeat(shop=shop, node=node, seq=1), at=NOW), NOW)
    clients = {}
    with TestClient(app):
        for user, role in ROLE_USERS.items():
            c = TestClient(app)
            c.headers["Authorization"] = f"Bearer {accounts.create_token(user, 'tests')}"
            clients[role] = c
        ingest = TestClient(app)
        ingest.headers["Authorization"] = f"Bearer {accounts.create_token('falco-sidekick', 'sidekick')}"
        yield SimpleNamespace(ingest=ingest, clients=clients, engine=registry.engine, mreg=mreg, bus=bus)


def count(mreg, name: str, **labels) -> float:
    return mreg.get_sample_value(name, labels) or 0.0


def test_the_machine_role_may_post_events_and_nothing_else():
    assert required_permission("POST", URL) == Permission.SECURITY_INGEST
    assert has_permission(Role.SECURITY_INGEST, Permission.SECURITY_INGEST)
    assert not has_permission(Role.SECURITY_INGEST, Permission.VIEW)
    assert not any(has_permission(r, Permission.SECURITY_INGEST) for r in Role if r not in (Role.SECURITY_INGEST, Role.ADMIN))


def test_an_event_becomes_an_alert_on_its_shop_and_repeats_are_counted(api):
    r = api.ingest.post(URL, json=falco(hostname="pi-2"))
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["opened"], body["shop"], body["count"]) == (True, "shop-a", 1)
    [a] = store.list_alerts(api.engine, NOW)
    assert a.rule == "security:shell_in_shopfleet_vision_container"
    assert (a.shop, a.node, a.source, a.severity) == ("shop-a", "pi-2", "shopfleet/vision", "warning")
    assert "pi-2" in a.summary and "vision-abc" in a.summary and "sh -c id" not in a.summary
    assert "user=root" in a.details and a.runbook
    assert a.started_at == pytest.approx(1_800_000_000.123, abs=1e-3)  # Falco's time (nanoseconds cut), not the post's

    # the same event again (another pod of the same container) folds into the alert; a Critical one raises its severity
    r = api.ingest.post(URL, json=falco(hostname="pi-2", priority="Critical", **{"k8s.pod.name": "vision-def"}))
    assert r.json()["opened"] is False and r.json()["count"] == 2
    [a] = store.list_alerts(api.engine, NOW)
    assert (a.value, a.severity) == (2.0, "critical") and "vision-def" in a.summary
    assert count(api.mreg, "shopfleet_controller_security_events_total", rule=a.rule, priority="warning") == 1
    assert count(api.mreg, "shopfleet_controller_security_events_total", rule=a.rule, priority="critical") == 1

    # visible to operators on the alerts pages (the same store the /alerts page lists)
    page = api.clients["viewer"].get("/alerts/history", headers={"accept": "text/html"})
    assert page.status_code == 200 and "Shell in shopfleet vision container on shop-a/pi-2" in page.text
    [h] = api.clients["viewer"].get("/api/v1/alerts/history").json()
    assert (h["rule"], h["shop"], h["severity"]) == (a.rule, "shop-a", "critical")


def test_shop_from_the_custom_field_else_hostname_else_fleet_level(api):
    assert api.ingest.post(URL, json=falco(hostname="pi-1", **{"shopfleet.shop": "shop-b"})).json()["shop"] == "shop-b"
    # pi-1 exists in two shops: ambiguous, so a fleet-level alert that says why (nothing dropped)
    r = api.ingest.post(URL, json=falco(rule="Write below usr in shopfleet pod", hostname="pi-1"))
    assert r.status_code == 202 and r.json()["shop"] == ""
    a = next(a for a in store.list_alerts(api.engine, NOW) if a.rule == "security:write_below_usr_in_shopfleet_pod")
    assert a.shop == "" and "several shops" in a.details and "shop unknown" in a.summary
    r = api.ingest.post(URL, json=falco(rule="Other", hostname="pi-9", **{"shopfleet.shop": "nowhere"}))
    assert r.json()["shop"] == ""
    [other] = [x for x in store.list_alerts(api.engine, NOW) if x.rule == "security:other"]
    assert "shop 'nowhere', which the fleet does not know" in other.details
    r = api.ingest.post(URL, json=falco(rule="Third", hostname="pi-9"))
    [third] = [x for x in store.list_alerts(api.engine, NOW) if x.rule == "security:third"]
    assert "no shop has a node named 'pi-9'" in third.details


@pytest.mark.parametrize(("body", "status", "reason", "words"), [
    (b"{not json", 400, "not_json", "not JSON"),
    (b"[1, 2]", 422, "invalid", "not an object"),
    (b'{"output": "x", "priority": "Warning", "time": "2027-01-15T08:00:00Z"}', 422, "invalid", "rule"),
    (b'{"output": "x", "priority": "Loud", "rule": "r", "time": "2027-01-15T08:00:00Z"}', 422, "invalid", "unknown priority 'Loud'"),
    (b'{"output": "x", "priority": "Warning", "rule": "r", "time": "yesterday"}', 422, "invalid", "time"),
    (b"x" * (MAX_BODY_BYTES + 1), 413, "too_large", "one Falco event per request"),
])
def test_hostile_bodies_are_refused_named_and_counted(api, body, status, reason, words):
    r = api.ingest.post(URL, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert count(api.mreg, "shopfleet_controller_security_events_rejected_total", reason=reason) == 1
    assert store.list_alerts(api.engine, NOW) == []


def test_only_the_ingest_role_and_admins_may_post(api):
    assert TestClient(api.ingest.app).post(URL, json=falco()).status_code == 401
    for role in ("viewer", "operator", "ml-engineer"):
        assert api.clients[role].post(URL, json=falco()).status_code == 403
    assert api.clients["admin"].post(URL, json=falco()).status_code == 202
    # the machine account reads nothing
    assert api.ingest.get("/api/v1/shops").status_code == 403


def test_event_alerts_resolve_after_a_quiet_hour_and_the_evaluator_leaves_them_alone(api):
    api.ingest.post(URL, json=falco(hostname="pi-2"))
    disk = Firing(alert_key("disk_low", "shop-a", "pi-2"), "disk_low", "shop-a", "pi-2", "", "warning", "disk", 1.0)
    changes = store.sync(api.engine, [disk], NOW + 60)  # the evaluator's firing set never holds the security alert
    assert changes.resolved == () and {a.rule for a in store.list_alerts(api.engine, NOW + 60)} == {
        "disk_low", "security:shell_in_shopfleet_vision_container"}
    changes = store.sync(api.engine, [disk], NOW + 60 + store.EVENT_QUIET_S)
    assert [a.rule for a in changes.resolved] == ["security:shell_in_shopfleet_vision_container"]
    assert [a.rule for a in store.list_alerts(api.engine, NOW + 60 + store.EVENT_QUIET_S)] == ["disk_low"]

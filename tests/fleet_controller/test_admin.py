"""Admin pages and API (users, roles, tokens), the audit log and its CSV, remote actions, maintenance.

Over HTTP through the real guard (sessions, CSRF, roles) on both engines; the remote actions'
signed commands are checked with the agent's own verifier (:class:`edge_agent.commands.CommandGuard`).
"""

from __future__ import annotations

import csv
import io
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edge_agent.commands import CommandGuard, CommandRefused
from edge_agent.protocol import CommandResult, Topics, parse_downlink
from fleet_controller.alerts import store as alert_store
from fleet_controller.alerts.evaluator import Firing
from fleet_controller.alerts.rules import AlertRules
from fleet_controller.intake.core import RegistryWriter
from fleet_controller.registry import maintenance as mt
from fleet_controller.registry.audit import AuditLog, AuditQuery
from fleet_controller.registry.read import RegistryReader
from fleet_controller.rollout.api import build_router as rollout_router
from fleet_controller.rollout.signing import generate_keypair
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.admin import admin_router
from fleet_controller.web.app import create_app
from fleet_controller.web.dashboard.live import LiveHub
from fleet_controller.web.dashboard.router import dashboard_router
from fleet_controller.web.remote_actions import RemoteActions, actions_router
from tests.support.controller import FAST, batch, heartbeat, login, presence, role_users

DIGEST = "@sha256:" + "ab" * 32


class Recorded:
    """A publisher that keeps what it was asked to publish (the broker side is tested in tests/edge_agent)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []

    def publish_sync(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1, timeout: float = 10.0) -> None:
        self.sent.append((topic, payload, retain))


@pytest.fixture
def admin_app(registry, db_url, tmp_path):
    store = AccountStore(registry.engine, FAST)
    creds = role_users(store)
    store.put_user("audra", "audra-test-pass", "auditor")
    creds["audra"] = "audra-test-pass"
    mreg = CollectorRegistry()
    auth = build_auth(store, mreg)
    reader = RegistryReader(registry.engine)
    writer = RegistryWriter(db_url, mode="thread")
    generate_keypair(tmp_path / "signing.key")
    pub = Recorded()
    actions = RemoteActions(registry.engine, reader, tmp_path / "signing.key", lambda: pub)
    app = create_app(reader, mreg, writer=writer, dependencies=[auth.dependency], routers=[
        auth.router, dashboard_router(reader, LiveHub(mreg), AlertRules()), admin_router(store), rollout_router(registry.engine),
        actions_router(actions)])
    registry.write_batch(batch(presence(shop="s1", node="pi-1"), heartbeat(shop="s1", node="pi-1", seq=1)), time.time())
    yield app, store, creds, pub, actions
    writer.close()


def session(app, creds, user: str) -> tuple[TestClient, str]:
    client = TestClient(app)
    assert login(client, user, creds[user]).status_code == 303
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/fleet").text).group(1)
    return client, csrf


def form_csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def audit_rows(store: AccountStore, **q) -> list:
    return AuditLog(store.engine).query(AuditQuery(**q))


# ----- roles ------------------------------------------------------------------------------------------------

ADMIN_READS = ["/admin/users", "/admin/tokens", "/api/v1/users", "/api/v1/tokens"]
AUDIT_READS = ["/admin/audit", "/api/v1/audit", "/api/v1/audit.csv"]


@pytest.mark.parametrize("user", ["viewer", "operator", "mlops"])
def test_admin_and_audit_pages_and_api_refuse_non_admins(admin_app, user):
    app, _store, creds, *_ = admin_app
    client, csrf = session(app, creds, user)
    for path in ADMIN_READS + AUDIT_READS:
        assert client.get(path).status_code == 403, path
    assert client.post("/api/v1/users", json={"username": "x", "role": "admin"}, headers={"X-CSRF-Token": csrf}).status_code == 403
    assert client.post("/api/v1/tokens", json={"user": user, "name": "mine"}, headers={"X-CSRF-Token": csrf}).status_code == 403
    assert client.post("/admin/users", data={"username": "x", "role": "admin", "csrf_token": csrf}).status_code == 403
    assert "/admin" not in re.findall(r'href="(/admin)"', client.get("/fleet").text)  # no Admin link in the menu


def test_the_auditor_reads_the_audit_log_and_nothing_of_users(admin_app):
    app, _store, creds, *_ = admin_app
    client, _ = session(app, creds, "audra")
    for path in AUDIT_READS:
        assert client.get(path).status_code == 200, path
    for path in ADMIN_READS:
        assert client.get(path).status_code == 403, path
    assert 'href="/admin"' in client.get("/fleet").text


def test_admin_pages_render_without_inline_script(admin_app):
    app, _store, creds, *_ = admin_app
    client, _ = session(app, creds, "admin")
    for path in ("/admin/users", "/admin/tokens", "/admin/audit", "/shops/s1"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) == [], path  # every script is a static file
        assert not re.search(r"\son[a-z]+=", page.text), path  # no inline event handlers
    assert client.get("/static/admin.js").status_code == 200 and client.get("/static/shop_actions.js").status_code == 200


# ----- users ------------------------------------------------------------------------------------------------


def test_users_page_creates_changes_resets_and_disables_with_csrf(admin_app):
    app, store, creds, *_ = admin_app
    client, _ = session(app, creds, "admin")
    page = client.get("/admin/users").text
    token = form_csrf(page)
    # without the form's CSRF token: refused by the guard, nothing created
    assert client.post("/admin/users", data={"username": "carol", "role": "operator"}).status_code == 403
    assert client.post("/admin/users", data={"username": "carol", "role": "operator", "csrf_token": "forged"}).status_code == 403
    assert "carol" not in {u.username for u in store.list_users()}
    made = client.post("/admin/users", data={"username": "carol", "role": "operator", "csrf_token": token})
    assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
    password = re.search(r'<code id="secret-value" data-secret>([^<]+)</code>', made.text).group(1)
    assert password not in client.get("/admin/users").text  # shown once
    carol = TestClient(app)
    assert login(carol, "carol", password).status_code == 303
    assert "password" in carol.get("/api/v1/fleet").json()["detail"]  # a one-time password: change it first
    # role change
    r = client.post("/admin/users/carol/role", data={"role": "viewer", "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and next(u for u in store.list_users() if u.username == "carol").role.value == "viewer"
    # reset: a new one-time password, the old one no longer works
    reset = client.post("/admin/users/carol/reset-password", data={"csrf_token": token})
    new_password = re.search(r'data-secret>([^<]+)</code>', reset.text).group(1)
    assert new_password != password and login(TestClient(app), "carol", password).status_code == 401
    # disable: the session ends, login fails; enable again
    carol2 = TestClient(app)
    assert login(carol2, "carol", new_password).status_code == 303
    client.post("/admin/users/carol/disable", data={"csrf_token": token})
    assert carol2.get("/api/v1/fleet").status_code == 401
    assert login(TestClient(app), "carol", new_password).status_code == 401
    assert "disabled" in client.get("/admin/users").text
    client.post("/admin/users/carol/enable", data={"csrf_token": token})
    assert login(TestClient(app), "carol", new_password).status_code == 303
    # the last admin can be neither disabled nor demoted
    bad = client.post("/admin/users/admin/disable", data={"csrf_token": token})
    assert bad.status_code == 400 and "last enabled admin" in bad.text
    actions = [e.action for e in audit_rows(store, actor="admin")]
    for a in ("user.create", "user.role", "user.reset_password", "user.disable", "user.enable"):
        assert a in actions


def test_users_api(admin_app):
    app, _store, creds, *_ = admin_app
    client, csrf = session(app, creds, "admin")
    h = {"X-CSRF-Token": csrf}
    assert client.post("/api/v1/users", json={"username": "dave", "role": "ml-engineer"}).status_code == 403  # no CSRF header
    made = client.post("/api/v1/users", json={"username": "dave", "role": "ml-engineer"}, headers=h)
    assert made.status_code == 201 and len(made.json()["one_time_password"]) >= 10
    assert client.post("/api/v1/users", json={"username": "dave", "role": "viewer"}, headers=h).status_code == 409
    assert client.post("/api/v1/users", json={"username": "eve", "role": "root"}, headers=h).status_code == 422
    assert client.patch("/api/v1/users/dave", json={"role": "operator", "disabled": True}, headers=h).json() | {
        "created_at": 0, "disabled_at": 0} == {"username": "dave", "role": "operator", "created_at": 0, "must_change_password": True,
                                               "disabled": True, "disabled_at": 0}
    assert client.patch("/api/v1/users/nobody", json={"disabled": True}, headers=h).status_code == 404
    assert client.patch("/api/v1/users/admin", json={"role": "viewer"}, headers=h).status_code == 409
    assert "one_time_password" in client.post("/api/v1/users/dave/reset-password", headers=h).json()
    assert client.delete("/api/v1/users/dave", headers=h).status_code == 204
    assert "dave" not in {u["username"] for u in client.get("/api/v1/users").json()}


# ----- tokens -----------------------------------------------------------------------------------------------


def test_token_is_shown_once_works_lists_last_use_and_revokes(admin_app):
    app, store, creds, *_ = admin_app
    client, _ = session(app, creds, "admin")
    token_csrf = form_csrf(client.get("/admin/tokens").text)
    made = client.post("/admin/tokens", data={"user": "operator", "name": "ci", "csrf_token": token_csrf})
    assert made.status_code == 201
    token = re.search(r"data-secret>(sft_[^<]+)</code>", made.text).group(1)
    listing = client.get("/admin/tokens").text
    assert token not in listing and "ci" in listing and "never" in listing  # not shown again; never used yet
    bot = TestClient(app)
    assert bot.get("/api/v1/fleet", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    api = client.get("/api/v1/tokens").json()
    (row,) = [t for t in api if t["name"] == "ci"]
    assert row["user"] == "operator" and row["last_used_at"] is not None and "token" not in row
    assert token not in str(api)
    r = client.post(f"/admin/tokens/{row['prefix']}/revoke", data={"csrf_token": token_csrf}, follow_redirects=False)
    assert r.status_code == 303
    assert bot.get("/api/v1/fleet", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    # over the API: the token comes back once in the response, then only its prefix
    _c, csrf = session(app, creds, "admin")
    body = _c.post("/api/v1/tokens", json={"user": "viewer", "name": "grafana"}, headers={"X-CSRF-Token": csrf}).json()
    assert body["token"].startswith("sft_") and body["token"] not in str(_c.get("/api/v1/tokens").json())
    assert _c.delete(f"/api/v1/tokens/{body['prefix']}", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert _c.delete(f"/api/v1/tokens/{body['prefix']}", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert [e.action for e in audit_rows(store, action="token.")] == ["token.revoke", "token.create", "token.revoke", "token.create"]


# ----- audit ------------------------------------------------------------------------------------------------


def test_every_kind_of_action_is_audited_with_who_what_when_where(admin_app, registry):
    app, store, creds, *_ = admin_app
    TestClient(app).post("/login", data={"username": "admin", "password": "wrong", "csrf_token": "x"})  # csrf failure
    bad = TestClient(app)
    login(bad, "operator", "wrong-password")
    admin, acsrf = session(app, creds, "admin")
    op, ocsrf = session(app, creds, "operator")
    ml, mcsrf = session(app, creds, "mlops")
    started = time.time()
    alert_store.sync(registry.engine, [Firing("disk_low/s1/pi-1/", "disk_low", "s1", "pi-1", "", "warning", "disk", 1.0)], started)
    (alert,) = alert_store.list_alerts(registry.engine, started)
    assert op.post(f"/api/v1/alerts/{alert.id}/ack", headers={"X-CSRF-Token": ocsrf}).status_code == 200
    assert op.post(f"/api/v1/alerts/{alert.id}/silence", json={"duration_s": 60, "comment": "on it"},
                   headers={"X-CSRF-Token": ocsrf}).status_code == 200
    assert admin.put("/api/v1/shops/s1", json={"name": "Shop One", "region": "north"}, headers={"X-CSRF-Token": acsrf}).status_code == 200
    rel = {"name": "r1", "version": "1", "images": {"vision": "reg.example/vision" + DIGEST}}
    assert ml.post("/api/v1/releases", json=rel, headers={"X-CSRF-Token": mcsrf}).status_code == 201
    ro = ml.post("/api/v1/rollouts", json={"release": "r1", "policy": {"waves": [{"name": "all", "percent": 100}]}},
                 headers={"X-CSRF-Token": mcsrf})
    assert ro.status_code == 201, ro.text
    assert ml.post(f"/api/v1/rollouts/{ro.json()['id']}/pause", json={"reason": "lunch"}, headers={"X-CSRF-Token": mcsrf}).status_code == 200
    for body in ({"shop": "s1", "action": "maintenance_on", "reason": "new fridge", "duration_s": 600},
                 {"shop": "s1", "action": "restart_pipeline", "node": "pi-1", "pipeline": "cam-1"},
                 {"shop": "s1", "action": "maintenance_off"}):
        r = op.post("/api/v1/actions", json=body, headers={"X-CSRF-Token": ocsrf})
        assert r.status_code == 202, r.text
    rows = {e.action: e for e in audit_rows(store)}
    expected = {
        "login.failed", "login", "alert.ack", "alert.silence", "shop.register", "release.create", "rollout.start", "rollout.pause",
        "shop.maintenance_on", "command.restart_pipeline", "shop.maintenance_off",
    }
    assert expected <= set(rows), expected - set(rows)
    assert rows["alert.silence"].actor == "operator" and rows["alert.silence"].details["comment"] == "on it"
    assert rows["alert.ack"].shop == "s1" and rows["alert.ack"].source_address == "testclient" and rows["alert.ack"].via == "session"
    assert rows["rollout.pause"].actor == "mlops" and rows["rollout.pause"].details == {"reason": "lunch"}
    assert rows["shop.register"].details == {"name": "Shop One", "region": "north"} and rows["shop.register"].actor == "admin"
    assert rows["command.restart_pipeline"].target == "s1/pi-1" and rows["command.restart_pipeline"].details["pipeline"] == "cam-1"
    fails = audit_rows(store, action="login.failed")
    assert {(e.actor, e.outcome) for e in fails} == {("admin", "csrf"), ("operator", "bad_credentials")}
    assert all(e.at >= started - 60 for e in rows.values())


def test_audit_page_filters_and_csv_export(admin_app):
    app, store, creds, *_ = admin_app
    log = AuditLog(store.engine, clock=lambda: 1_800_000_000.0)
    log.record("alice", "shop.maintenance_on", "s1", {"reason": "=HYPERLINK(\"x\")"}, "10.0.0.1", shop="s1")
    log.record("bob", "rollout.pause", "rollout 3", None, "10.0.0.2")
    AuditLog(store.engine, clock=lambda: 1_800_086_400.0).record("alice", "rollout.abort", "rollout 3", None, "10.0.0.1")
    client, _ = session(app, creds, "audra")
    page = client.get("/admin/audit", params={"actor": "alice"}).text
    assert "shop.maintenance_on" in page and "rollout.abort" in page and "bob" not in page
    assert [e["action"] for e in client.get("/api/v1/audit", params={"action": "rollout."}).json()] == ["rollout.abort", "rollout.pause"]
    assert [e["actor"] for e in client.get("/api/v1/audit", params={"shop": "s1"}).json()] == ["alice"]
    day = client.get("/api/v1/audit", params={"since": "2027-01-15T08:00", "until": "2027-01-16T07:00"}).json()
    assert [e["action"] for e in day] == ["rollout.pause", "shop.maintenance_on"]  # 1_800_000_000 = 2027-01-15T08:00:00Z
    assert client.get("/api/v1/audit", params={"since": "yesterday"}).status_code == 422
    assert client.get("/admin/audit", params={"since": "yesterday"}).status_code == 400
    export = client.get("/api/v1/audit.csv", params={"actor": "alice"})
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    assert "attachment" in export.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert [r["action"] for r in rows] == ["rollout.abort", "shop.maintenance_on"]
    assert rows[1]["source_address"] == "10.0.0.1" and rows[1]["time_utc"] == "2027-01-15T08:00:00Z" and rows[1]["shop"] == "s1"
    assert '"=HYPERLINK' not in export.text.split("\n")[2].split(",", 3)[0]
    assert rows[1]["details"].startswith("{") and "HYPERLINK" in rows[1]["details"]
    assert audit_rows(store, action="audit.export")[0].actor == "audra"  # exporting is itself audited
    assert client.post("/api/v1/audit", headers={"X-CSRF-Token": "x"}).status_code in (403, 405)  # read-only


def test_csv_cells_that_look_like_formulas_are_defused(registry):
    from fleet_controller.registry.audit import csv_lines

    log = AuditLog(registry.engine)
    log.record("=cmd|' /C calc'!A0", "login.failed", "=cmd", None, "1.2.3.4")
    text = "".join(csv_lines(log.query(AuditQuery())))
    row = list(csv.reader(io.StringIO(text)))[1]
    assert row[3].startswith("'=") and row[5].startswith("'=")


# ----- remote actions ---------------------------------------------------------------------------------------


def test_restart_is_a_signed_command_the_agent_verifies_and_its_result_settles_the_action(admin_app, registry, tmp_path):
    app, _store, creds, pub, _actions = admin_app
    op, csrf = session(app, creds, "operator")
    viewer, vcsrf = session(app, creds, "viewer")
    body = {"shop": "s1", "action": "restart_pipeline", "node": "pi-1", "pipeline": "cam-1"}
    assert viewer.post("/api/v1/actions", json=body, headers={"X-CSRF-Token": vcsrf}).status_code == 403
    assert op.post("/api/v1/actions", json={**body, "node": "pi-9"}, headers={"X-CSRF-Token": csrf}).status_code == 404
    assert op.post("/api/v1/actions", json={"shop": "s1", "action": "restart_pipeline"}, headers={"X-CSRF-Token": csrf}).status_code == 422
    action = op.post("/api/v1/actions", json=body, headers={"X-CSRF-Token": csrf}).json()
    assert action["status"] == "pending"
    topic, payload, retain = pub.sent[-1]
    assert topic == Topics.node("s1", "pi-1", "commands") and not retain
    cmd = parse_downlink(topic, payload)
    assert cmd.correlation_id == action["correlation_id"] and cmd.counter == 1 and cmd.signature is not None
    guard = CommandGuard.from_files("s1", "pi-1", [tmp_path / "signing.pub"], tmp_path / "counter.json")
    guard.check(cmd, time.time())  # the agent's own check accepts it
    with pytest.raises(CommandRefused) as replay:
        guard.check(cmd, time.time())
    assert replay.value.reason == "replay"
    # the node answers; the action settles with its message
    registry.write_batch(batch(CommandResult(shop="s1", node="pi-1", epoch="ep1", seq=2, correlation_id=cmd.correlation_id, ok=False,
                                             error="no pipeline 'cam-1' on this node; it runs: cam-0")), time.time())
    listed = viewer.get("/api/v1/actions", params={"shop": "s1"}).json()["actions"][0]
    assert listed["status"] == "failed" and "it runs: cam-0" in listed["message"]
    second = op.post("/api/v1/actions", json=body, headers={"X-CSRF-Token": csrf}).json()
    assert parse_downlink(*pub.sent[-1][:2]).counter == 2  # counters increase per node
    assert second["status"] == "pending"


def test_an_unanswered_command_expires(admin_app):
    _app, _store, _creds, _pub, actions = admin_app
    a = actions.send_command("s1", "pi-1", "restart_pipeline", {"pipeline": "cam-1"})
    actions.clock = lambda: time.time() + 3600
    (settled,) = [x for x in actions.settle("s1") if x.id == a.id]
    assert settled.status == "expired" and "no answer from pi-1" in settled.message


def test_maintenance_mutes_the_shops_alerts_and_shows_on_the_shop_page(admin_app, registry):
    app, _store, creds, *_ = admin_app
    op, csrf = session(app, creds, "operator")
    now = time.time()
    firing = [Firing("disk_low/s1/pi-1/", "disk_low", "s1", "pi-1", "", "warning", "disk", 1.0),
              Firing("disk_low/s2/pi-1/", "disk_low", "s2", "pi-1", "", "warning", "disk", 1.0)]
    op.post("/api/v1/actions", json={"shop": "s1", "action": "maintenance_on", "duration_s": 600, "reason": "fridge swap"},
            headers={"X-CSRF-Token": csrf})
    changes = alert_store.sync(registry.engine, firing, now)
    muted = {a.shop: a.silenced_until for a in changes.opened}
    assert muted["s1"] is not None and muted["s1"] >= now + 590 and muted["s2"] is None  # the webhook skips silenced alerts
    assert {a.shop: a.status for a in alert_store.list_alerts(registry.engine, now)} == {"s1": "silenced", "s2": "firing"}
    state = op.get("/api/v1/actions", params={"shop": "s1"}).json()
    assert state["maintenance"]["reason"] == "fridge swap" and state["maintenance"]["by"] == "operator"
    assert mt.shops_in_maintenance(registry.engine, now) == {"s1"}
    page = op.get("/shops/s1").text
    assert 'data-shop-actions="s1"' in page and "Start maintenance" in page and "Put shop s1 in maintenance?" in page
    op.post("/api/v1/actions", json={"shop": "s1", "action": "maintenance_off"}, headers={"X-CSRF-Token": csrf})
    assert {a.shop: a.status for a in alert_store.list_alerts(registry.engine, now)}["s1"] == "firing"
    assert mt.shops_in_maintenance(registry.engine, now + 1) == frozenset()
    # maintenance ends by itself
    mt.set_maintenance(registry.engine, "s2", "x", now - 100, until=now - 1)
    assert mt.shops_in_maintenance(registry.engine, now) == frozenset()


def test_actions_need_the_signing_key(registry):
    reader = RegistryReader(registry.engine)
    registry.write_batch(batch(presence(shop="s1", node="pi-1")), time.time())
    from fleet_controller.web.remote_actions import ActionRequest, ActionUnavailable

    actions = RemoteActions(registry.engine, reader, None, lambda: None)
    with pytest.raises(ActionUnavailable, match="rollout.signing_key"):
        actions.do(ActionRequest(shop="s1", action="restart_pipeline", node="pi-1", pipeline="cam"))
    assert actions.do(ActionRequest(shop="s1", action="maintenance_on")).status == "ok"  # controller-side: no key needed


def test_resend_publishes_the_same_revision_signed_and_settles_on_the_applier_report(registry, tmp_path: Path):
    from edge_agent.apply.verify import Verifier
    from edge_agent.protocol import ReportedState
    from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
    from fleet_controller.rollout.store import DESIRED

    reader = RegistryReader(registry.engine)
    registry.write_batch(batch(presence(shop="s1", node="pi-1"), heartbeat(shop="s1", node="pi-1", seq=1)), time.time())
    ReleaseStore(registry.engine).create(ReleaseSpec(name="r1", version="1", images={"vision": "reg.example/vision" + DIGEST}))
    with registry.engine.begin() as conn:
        conn.execute(DESIRED.insert().values(shop_id="s1", revision=4, release="r1", rollout_id=None, published_at=time.time()))
    generate_keypair(tmp_path / "k.key")
    pub = Recorded()
    actions = RemoteActions(registry.engine, reader, tmp_path / "k.key", lambda: pub)
    a = actions.resend_desired("s1")
    topic, payload, retain = pub.sent[-1]
    state = parse_downlink(topic, payload)
    assert topic == Topics.desired("s1") and retain and state.revision == 4 and state.release == "r1"
    Verifier.from_files([tmp_path / "k.pub"]).verify(state)
    assert a.status == "pending" and a.revision == 4
    registry.write_batch(batch(ReportedState(shop="s1", node="pi-1", epoch="ep1", seq=2, release="r1", revision=4, status="applied",
                                             error="already applied")), time.time() + 1)
    (done,) = actions.settle("s1")
    assert done.status == "ok" and "applied" in done.message

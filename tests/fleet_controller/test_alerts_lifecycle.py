"""Alerts people trust: flaps, true start times, timers across restarts, human text, silences, history, channels.

Store and worker tests run on SQLite and PostgreSQL (the ``registry`` fixture); the API tests go
through the real guard with one API token per role; channels deliver to a real HTTP receiver and
a real SMTP server on 127.0.0.1 (tests/support/smtp.py) through ``smtplib``.
"""

from __future__ import annotations

import http.server
import json
import threading
from types import SimpleNamespace

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from edge_agent.protocol import Alert, PipelineHealth
from fleet_controller.alerts import channels, messages, store
from fleet_controller.alerts.evaluator import (
    Firing,
    FleetSnapshot,
    NodeRaised,
    NodeSnapshot,
    alert_key,
    evaluate,
)
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.alerts.rules import AlertRules, parse_rules
from fleet_controller.alerts.worker import AlertWorker
from fleet_controller.registry.bus import EventBus
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.accounts.store import AccountStore
from fleet_controller.web.accounts.web import build_auth
from fleet_controller.web.alerts_pages import alerts_router
from fleet_controller.web.app import create_app
from tests.support.controller import ROLE_USERS, batch, heartbeat, presence, role_users
from tests.support.smtp import SmtpServer

NOW = 1_800_000_000.0
RAW = "/tmp/shopfleet-demo-x1/hardware/shop-a/shelf-1 on /dev/pts/7 stopped answering ([Errno 5] Input/output error); check its USB cable"


def cable(seq: int, state: str, at: float, shop: str = "s1", node: str = "n1") -> Alert:
    return Alert(shop=shop, node=node, seq=seq, epoch="ep1", name="sensor_board_disconnected", state=state, severity="warning",
                 source="shelf-1", message=RAW if state == "firing" else "shelf-1 is back", ts=at)


def worker(registry, rules: AlertRules, clock: list[float], mreg: CollectorRegistry | None = None, **kw) -> AlertWorker:
    return AlertWorker(RegistryReader(registry.engine), rules, AlertMetrics(mreg or CollectorRegistry()), clock=lambda: clock[0], **kw)


# ----- hysteresis and flaps ---------------------------------------------------------------------------------


def disk(summary="x"):
    return Firing(alert_key("disk_low", "s1", "n1"), "disk_low", "s1", "n1", "", "warning", summary, 1.0)


def test_condition_that_comes_and_goes_is_one_alert_with_a_flap_count(registry):
    e = registry.engine
    after = {"disk_low": 300.0}.__getitem__
    [a] = store.sync(e, [disk()], NOW, after).opened
    for i in range(20):  # clears and comes back every 75 s, twenty times
        t = NOW + 75 * i
        ch = store.sync(e, [], t + 40, after)
        assert not ch.resolved and not ch.opened
        ch = store.sync(e, [disk()], t + 75, after)
        assert not ch.opened and [x.id for x in ch.flapped] == [a.id]
    [open_] = store.list_alerts(e, NOW + 2000)
    assert (open_.id, open_.flaps, open_.started_at) == (a.id, 20, NOW)
    assert store.sync(e, [], NOW + 1600, after).resolved == ()  # clear, but not for 300 s yet
    ch = store.sync(e, [], NOW + 1900, after)
    [r] = ch.resolved
    assert r.id == a.id and r.resolved_at == NOW + 1600  # the true end: when it cleared, not when we gave up waiting
    assert r.duration_s(NOW + 5000) == 1600
    assert len(store.history(e, NOW + 2000)) == 1


async def test_pulled_cable_from_a_node_is_one_alert_and_notifies_once(registry):
    registry.write_batch(batch(presence(shop="s1", node="n1"), heartbeat(shop="s1", node="n1", seq=1), at=NOW), NOW)
    received: list[dict] = []
    with _receiver(received) as port:
        clock = [NOW]
        w = worker(registry, parse_rules("node_alerts: {resolve_after_s: 120}"), clock, webhook_base_delay_s=0.01)
        channels.save_channel(registry.engine, channels.ChannelSpec(name="hook", kind="webhook", config={"url": f"http://127.0.0.1:{port}/h"}),
                              "admin", NOW)
        seq = 2
        async with httpx.AsyncClient() as client:
            for cycle in range(5):
                t = NOW + 75 * cycle
                registry.write_batch(batch(cable(seq, "firing", t), at=t), t)
                clock[0] = t + 1
                await w.tick(client)
                registry.write_batch(batch(cable(seq + 1, "resolved", t + 20), at=t + 20), t + 20)
                clock[0] = t + 21
                await w.tick(client)
                seq += 2
            await w.flush()
    [a] = store.history(registry.engine, clock[0])
    assert a.state == "firing" and a.flaps == 4 and a.started_at == NOW
    assert "/tmp" not in a.summary and "Errno" not in a.summary and "/dev" not in a.summary
    assert a.summary == "sensor board not answering: shelf 1 on s1/n1 - the USB link failed (I/O error)"
    assert a.details == RAW and "USB cable" in a.runbook
    assert [b["status"] for b in received] == ["firing"]  # one notification, not ten


# ----- true start time and timers across restarts ------------------------------------------------------------


def slow_cam(fps: float) -> FleetSnapshot:
    return FleetSnapshot((NodeSnapshot("s1", "n1", "online", NOW, {}, {"cam-entrance": {"kind": "vision", "state": "running", "fps": fps}}),))


def test_camera_alert_starts_when_the_camera_got_slow_not_when_for_s_ran_out():
    first = evaluate(slow_cam(2.0), AlertRules(), NOW)
    later = evaluate(slow_cam(2.0), AlertRules(), NOW + 130, pending=first.pending)
    [f] = later.firing
    assert f.since == NOW
    assert f.summary == "camera slow: cam entrance on s1/n1 at 2.0 fps (needs 5)"


def test_for_s_timer_survives_a_controller_restart(registry):
    registry.write_batch(batch(presence(shop="s1", node="n1"), heartbeat(shop="s1", node="n1", seq=1, pipelines={
        "cam-entrance": PipelineHealth(kind="vision", state="running", fps=2.0)}), at=NOW), NOW)
    clock = [NOW]
    rules = parse_rules("camera_fps_low: {for_s: 120}\nnode_offline: {enabled: false}\ndisk_low: {enabled: false}\nclock_skew: {enabled: false}")
    assert worker(registry, rules, clock).evaluate_once().opened == ()
    clock[0] = NOW + 125  # the controller restarted meanwhile: a new worker, the same database
    [a] = worker(registry, rules, clock).evaluate_once().opened
    assert a.rule == "camera_fps_low" and a.started_at == NOW


def test_node_raised_alert_keeps_the_nodes_start_time_across_repeats(registry):
    registry.write_batch(batch(presence(shop="s1", node="n1"), heartbeat(shop="s1", node="n1", seq=1), at=NOW), NOW)
    registry.write_batch(batch(cable(2, "firing", NOW - 100), cable(3, "firing", NOW - 10), at=NOW), NOW)
    clock = [NOW]
    [a] = worker(registry, AlertRules(), clock).evaluate_once().opened
    assert a.started_at == NOW - 100


# ----- human messages -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        pytest.param("[Errno 2] No such file or directory: '/tmp/x/shelf-1'", "cable unplugged", id="enoent"),
        pytest.param("read failed: [Errno 5] Input/output error", "I/O error", id="eio"),
        pytest.param("could not open port /dev/ttyACM0: [Errno 13] Permission denied", "no permission", id="eacces"),
        pytest.param("no hello within 10s (timed out)", "no answer in time", id="timeout"),
        pytest.param("something new", "", id="unknown"),
    ],
)
def test_raw_os_errors_map_to_short_causes(raw, cause):
    assert cause in messages.cause(raw) if cause else messages.cause(raw) == ""


def test_where_names_sources_in_words():
    assert messages.where("shop-a", "pi-1", "fridge-1") == "fridge 1 on shop-a/pi-1"
    assert messages.where("shop-a", "pi-1", "shelf-1/3", {"sensor": "fridge-thermometer"}) == "fridge thermometer on shelf-1 (channel 3) on shop-a/pi-1"
    assert messages.where("shop-a", "pi-1", "/tmp/shopfleet-x/hardware/shelf-1") == "shelf 1 on shop-a/pi-1"
    assert messages.where("shop-a", "") == "shop-a"


def test_every_rule_has_a_runbook_and_a_rule_may_override_it():
    snap = FleetSnapshot((NodeSnapshot("s1", "n1", "offline", NOW - 900, {}, {}),))
    [f] = evaluate(snap, AlertRules(), NOW).firing
    assert f.runbook == messages.RUNBOOKS["node_offline"] and f.since == NOW - 900
    [f] = evaluate(snap, parse_rules("node_offline: {runbook: 'Call the shop manager.'}"), NOW).firing
    assert f.runbook == "Call the shop manager."
    raised = FleetSnapshot(node_alerts=(NodeRaised("s1", "n1", "camera_dark", "cam-1", "firing", "warning", "camera cam-1 delivered no frame for 5s (timed out)"),))
    [f] = evaluate(raised, AlertRules(), NOW).firing
    assert f.summary == "camera delivers no frames: cam 1 on s1/n1 - no answer in time" and "lens" in f.runbook


# ----- API: silences and history -------------------------------------------------------------------------------


@pytest.fixture
def api(registry):
    """The guard plus the alerts router, one bearer token per role; ``api.clients[role]``, ``api.clock``."""
    accounts = AccountStore(registry.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    role_users(accounts)
    mreg = CollectorRegistry()
    metrics = AlertMetrics(mreg)
    auth = build_auth(accounts, mreg)
    clock = [NOW]
    bus = EventBus()
    host = SimpleNamespace(engine=registry.engine, bus=bus)
    app = create_app(RegistryReader(registry.engine), mreg, routers=[auth.router, alerts_router(host, metrics, clock=lambda: clock[0])],
                     dependencies=[auth.dependency])
    clients = {}
    with TestClient(app) as base:
        for user, role in ROLE_USERS.items():
            c = TestClient(app)
            c.headers["Authorization"] = f"Bearer {accounts.create_token(user, 'tests')}"
            clients[role] = c
        yield SimpleNamespace(clients=clients, clock=clock, engine=registry.engine, mreg=mreg, base=base)


def test_silence_with_duration_comment_author_and_undo(api):
    [a] = store.sync(api.engine, [disk()], NOW).opened
    op = api.clients["operator"]
    r = op.post("/api/v1/silences", json={"alert_id": a.id, "duration_s": 4 * 3600, "comment": "supplier swaps the disk at 14:00"})
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["until"], s["created_by"], s["comment"], s["active"]) == (NOW + 4 * 3600, "operator", "supplier swaps the disk at 14:00", True)
    assert store.list_alerts(api.engine, NOW)[0].status == "silenced"
    assert api.clients["viewer"].post("/api/v1/silences", json={"alert_id": a.id, "duration_s": 60}).status_code == 403
    assert op.post("/api/v1/silences", json={"duration_s": 60}).status_code == 422  # neither alert_id nor key
    assert op.post("/api/v1/silences", json={"alert_id": 999, "duration_s": 60}).status_code == 404
    api.clock[0] = NOW + 60
    r = op.post(f"/api/v1/silences/{s['id']}/expire")
    assert r.status_code == 200 and r.json()["expired_by"] == "operator" and r.json()["active"] is False
    assert store.list_alerts(api.engine, NOW + 61)[0].status == "firing"
    listed = api.clients["viewer"].get("/api/v1/silences").json()
    assert [(x["id"], x["active"], x["expired_by"]) for x in listed] == [(s["id"], False, "operator")]
    key = alert_key("node_offline", "s1", "n2")
    r = op.post("/api/v1/silences", json={"key": key, "duration_s": 900, "comment": "shop closed"})
    assert r.json()["node"] == "n2" and r.json()["rule"] == "node_offline"


def test_history_has_node_duration_flaps_and_acknowledger_and_filters(api):
    e = api.engine
    [a] = store.sync(e, [disk()], NOW).opened
    store.acknowledge(e, a.id, "olga", NOW + 30)
    store.sync(e, [], NOW + 600)
    other = Firing(alert_key("clock_skew", "s2", "n9"), "clock_skew", "s2", "n9", "", "warning", "clock off", 3.0)
    store.sync(e, [other], NOW + 7200)
    api.clock[0] = NOW + 7300
    rows = api.clients["viewer"].get("/api/v1/alerts/history").json()
    assert [r["rule"] for r in rows] == ["clock_skew", "disk_low"]
    d = rows[1]
    assert (d["node"], d["duration_s"], d["acked_by"], d["state"]) == ("n1", 600, "olga", "resolved")
    assert rows[0]["duration_s"] == 100 and rows[0]["state"] == "firing"
    v = api.clients["viewer"]
    assert [r["rule"] for r in v.get("/api/v1/alerts/history", params={"shop": "s1"}).json()] == ["disk_low"]
    assert [r["rule"] for r in v.get("/api/v1/alerts/history", params={"rule": "clock_skew"}).json()] == ["clock_skew"]
    assert [r["rule"] for r in v.get("/api/v1/alerts/history", params={"start": NOW + 3600}).json()] == ["clock_skew"]
    assert [r["rule"] for r in v.get("/api/v1/alerts/history", params={"end": "2027-01-15T08:10:00"}).json()] == ["disk_low"]
    r = v.get("/api/v1/alerts/history", params={"start": "yesterday"})
    assert r.status_code == 422 and "ISO time" in r.json()["detail"]
    page = v.get("/alerts/history", params={"shop": "s1"}, headers={"Accept": "text/html"})
    assert page.status_code == 200 and "olga" in page.text and "10 min" in page.text


# ----- channels -----------------------------------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append(body)
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


class _receiver:
    def __init__(self, received: list, statuses: list[int] | None = None) -> None:
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
        self.srv.received, self.srv.statuses = received, list(statuses or [])

    def __enter__(self) -> int:
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return self.srv.server_port

    def __exit__(self, *exc) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def _opened_alert(registry) -> store.AlertView:
    f = Firing(alert_key("fridge_warm", "s1", "n1", "fridge-1"), "fridge_warm", "s1", "n1", "fridge-1", "critical",
               "fridge warm: fridge 1 on s1/n1 at 9.4 °C (limit 8 °C)", 9.4, since=NOW - 700, runbook=messages.RUNBOOKS["fridge_warm"])
    [a] = store.sync(registry.engine, [f], NOW).opened
    return a


async def test_email_channel_delivers_through_smtp_to_a_local_server(registry):
    a = _opened_alert(registry)
    mreg = CollectorRegistry()
    metrics = AlertMetrics(mreg)
    with SmtpServer(password="s3cret") as smtp:
        spec = channels.ChannelSpec(name="oncall mail", kind="email", severities=["critical"], config={
            "host": "127.0.0.1", "port": smtp.port, "security": "none", "username": "shopfleet", "password": "s3cret",
            "from_addr": "shopfleet@example.com", "to": ["oncall@example.com"]})
        ch = channels.save_channel(registry.engine, spec, "admin", NOW)
        async with httpx.AsyncClient() as client:
            assert await channels.deliver(client, registry.engine, ch, a, metrics.notifications, dashboard_url="http://dash") == ""
        [m] = smtp.messages
    assert m.login == "shopfleet" and m.rcpt_to == ["oncall@example.com"]
    assert m.message["Subject"] == "[CRITICAL] fridge warm: fridge 1 on s1/n1 at 9.4 °C (limit 8 °C)"
    body = m.message.get_payload(decode=True).decode()
    assert "What to do: Check the fridge door" in body and "http://dash/shops/s1" in body
    assert mreg.get_sample_value("shopfleet_controller_alert_notifications_total", {"channel": "oncall mail", "outcome": "sent"}) == 1
    [stored] = channels.list_channels(registry.engine)
    assert (stored.last_outcome, stored.sent_total) == ("sent", 1)


async def test_refused_smtp_login_is_a_permanent_failure_not_retried(registry):
    a = _opened_alert(registry)
    mreg = CollectorRegistry()
    with SmtpServer(password="right") as smtp:
        ch = channels.save_channel(registry.engine, channels.ChannelSpec(name="mail", kind="email", config={
            "host": "127.0.0.1", "port": smtp.port, "security": "none", "username": "u", "password": "wrong",
            "from_addr": "a@example.com", "to": ["b@example.com"]}), "admin", NOW)
        async with httpx.AsyncClient() as client:
            error = await channels.deliver(client, registry.engine, ch, a, AlertMetrics(mreg).notifications, base_delay_s=0.01)
    assert "login refused" in error and smtp.messages == []
    assert mreg.get_sample_value("shopfleet_controller_alert_notifications_total", {"channel": "mail", "outcome": "retry"}) is None
    assert mreg.get_sample_value("shopfleet_controller_alert_notifications_total", {"channel": "mail", "outcome": "failed"}) == 1


async def test_failing_webhook_is_retried_with_backoff_and_counted(registry):
    a = _opened_alert(registry)
    mreg = CollectorRegistry()
    m = AlertMetrics(mreg).notifications
    received: list[dict] = []
    with _receiver(received, [503, 502, 503, 503, 503]) as port:
        ch = channels.save_channel(registry.engine, channels.ChannelSpec(
            name="hook", kind="webhook", retries=2, config={"url": f"http://127.0.0.1:{port}/h"}), "admin", NOW)
        async with httpx.AsyncClient() as client:
            error = await channels.deliver(client, registry.engine, ch, a, m, base_delay_s=0.01)
            assert "HTTP 503" in error and len(received) == 3
            ch = channels.save_channel(registry.engine, channels.ChannelSpec(
                name="hook", kind="webhook", retries=3, config={"url": f"http://127.0.0.1:{port}/h"}), "admin", NOW, ch.id)
            assert await channels.deliver(client, registry.engine, ch, a, m, base_delay_s=0.01) == ""  # 503, 503, then 200
    sample = lambda outcome: mreg.get_sample_value("shopfleet_controller_alert_notifications_total", {"channel": "hook", "outcome": outcome})  # noqa: E731
    assert (sample("retry"), sample("failed"), sample("sent")) == (4, 1, 1)
    assert received[-1]["annotations"]["runbook"].startswith("Check the fridge door") and received[-1]["startsAt"].startswith("2027")
    [stored] = channels.list_channels(registry.engine)
    assert (stored.sent_total, stored.failed_total, stored.last_outcome) == (1, 1, "sent")


async def test_chat_channel_posts_slack_compatible_text(registry):
    a = _opened_alert(registry)
    received: list[dict] = []
    with _receiver(received) as port:
        ch = channels.save_channel(registry.engine, channels.ChannelSpec(
            name="chat", kind="chat", config={"url": f"http://127.0.0.1:{port}/hooks/T000/B000/XXXXSECRET"}), "admin", NOW)
        async with httpx.AsyncClient() as client:
            assert await channels.deliver(client, registry.engine, ch, a, AlertMetrics(CollectorRegistry()).notifications) == ""
    [body] = received
    assert body["username"] == "shopfleet" and body["text"].startswith("[CRITICAL] fridge warm: fridge 1 on s1/n1")


def test_channels_api_is_for_admins_masks_secrets_keeps_them_on_edit_and_sends_tests(api):
    admin = api.clients["admin"]
    received: list[dict] = []
    with _receiver(received) as port:
        url = f"http://127.0.0.1:{port}/hooks/T000/B000/XXXXSECRETTOKEN"
        body = {"name": "ops chat", "kind": "chat", "config": {"url": url, "headers": {"Authorization": "Bearer tok-123"}},
                "severities": ["critical"], "shops": ["s1"]}
        assert api.clients["operator"].post("/api/v1/alert-channels", json=body).status_code == 403
        assert api.clients["operator"].get("/api/v1/alert-channels").status_code == 403
        r = admin.post("/api/v1/alert-channels", json=body)
        assert r.status_code == 200, r.text
        c = r.json()
        assert "SECRETTOKEN" not in json.dumps(c) and "tok-123" not in json.dumps(c)
        assert c["config"]["url"].startswith(f"http://127.0.0.1:{port}/") and c["config"]["url"].endswith("OKEN")
        assert admin.post("/api/v1/alert-channels", json=body).status_code == 409
        bad = admin.post("/api/v1/alert-channels", json={**body, "name": "x", "config": {"url": "ftp://x"}})
        assert bad.status_code == 422 and "http:// or https://" in bad.text
        # Edit with the masked URL sent back and no headers: the stored secrets stay.
        r = admin.put(f"/api/v1/alert-channels/{c['id']}", json={**body, "config": {"url": c["config"]["url"]}, "severities": []})
        assert r.status_code == 200 and r.json()["severities"] == []
        [stored] = channels.list_channels(api.engine)
        assert stored.config["url"] == url and stored.config["headers"] == {"Authorization": "Bearer tok-123"}
        r = admin.post(f"/api/v1/alert-channels/{c['id']}/test")
        assert r.json() == {"ok": True, "error": ""}
        assert "test message from shopfleet" in received[0]["text"]
        page = admin.get("/alerts/channels", headers={"Accept": "text/html"})
        assert page.status_code == 200 and "ops chat" in page.text and "SECRETTOKEN" not in page.text
        assert api.clients["operator"].get("/alerts/channels", headers={"Accept": "text/html"}).status_code == 403
        assert admin.delete(f"/api/v1/alert-channels/{c['id']}").status_code == 200
        assert admin.delete(f"/api/v1/alert-channels/{c['id']}").status_code == 404
    assert api.mreg.get_sample_value("shopfleet_controller_alert_notifications_total", {"channel": "ops chat", "outcome": "sent"}) == 1


def test_channel_hears_only_its_severities_shops_and_resolutions():
    c = channels.ChannelView(1, "c", "webhook", {}, ("critical",), ("s1",), False, True, 3, "a", 0, 0, None, None, None, 0, 0)
    base = store.AlertView(1, "k", "r", "s1", "n", "", "critical", "x", None, "firing", 0, 0, None, None, None)
    assert c.wants(base)
    assert not c.wants(store.AlertView(**{**base.__dict__, "severity": "warning"}))
    assert not c.wants(store.AlertView(**{**base.__dict__, "shop": "s2"}))
    assert not c.wants(store.AlertView(**{**base.__dict__, "state": "resolved"}))


# ----- the demo's warm fridge ---------------------------------------------------------------------------------


def test_demo_board_of_the_first_shop_warms_its_fridge_past_the_limit_for_longer_than_for_s(tmp_path):
    from shopfleet.sim.shelf import ShelfBoard
    from tests.support.wait import wait_for

    first, other = ShelfBoard("shop-a", tmp_path / "a", seed=0), ShelfBoard("shop-b", tmp_path / "b", seed=1)
    assert first.warm_fridge and not other.warm_fridge
    rule = AlertRules().fridge_warm
    assert rule.max_c < first.FRIDGE_WARM_C and rule.for_s < first.WARM_FOR_S and rule.clear_below_c > first.FRIDGE_COLD_C
    first.WARM_AFTER_S = 0.0
    first.start()
    try:
        wait_for(lambda: first.board._ch[first.fridge_channel].value == first.FRIDGE_WARM_C, what="the fridge warmed")
    finally:
        first.stop()


def test_a_removed_nodes_offline_alert_resolves_and_no_other_opens(registry):
    """A node retired on purpose: its node_offline alert resolves once it is removed (resolve_after_s later), not for ever."""
    registry.write_batch(batch(presence(shop="s1", node="n1"), heartbeat(shop="s1", node="n1", seq=1), at=NOW), NOW)
    registry.write_batch(batch(presence(shop="s1", node="n2"), heartbeat(shop="s1", node="n2", seq=1), at=NOW), NOW)
    clock = [NOW + 3600]  # both silent for an hour
    from fleet_controller.settings import PresenceSettings

    registry.sweep_presence(PresenceSettings(), clock[0])
    rules = AlertRules()
    w = worker(registry, rules, clock)
    opened = w.evaluate_once().opened
    assert sorted(a.node for a in opened if a.rule == "node_offline") == ["n1", "n2"]
    registry.remove_node("s1", "n1")
    clock[0] += 1
    assert w.evaluate_once().resolved == ()  # clear from now on, and held for resolve_after_s against flaps
    clock[0] += rules.resolve_after("node_offline") + 1
    changes = w.evaluate_once()
    assert [a.node for a in changes.resolved] == ["n1"] and changes.opened == ()
    assert {(a.node, a.state) for a in store.list_alerts(registry.engine, 0) if a.rule == "node_offline"} == {("n2", "firing")}

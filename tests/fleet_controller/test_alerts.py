"""Alerts: rules loading, the pure evaluator as tables, storage on both engines, worker, webhook."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from fleet_controller.alerts import store
from fleet_controller.alerts.evaluator import (
    FleetSnapshot,
    NodeRaised,
    NodeSnapshot,
    ReadingSnapshot,
    alert_key,
    evaluate,
)
from fleet_controller.alerts.metrics import AlertMetrics
from fleet_controller.alerts.rules import AlertRules, RulesError, Webhook, load_rules, parse_rules
from fleet_controller.alerts.webhook import send
from fleet_controller.alerts.worker import AlertWorker
from fleet_controller.registry.read import RegistryReader
from tests.support.controller import alert as node_alert
from tests.support.controller import batch, heartbeat, presence, telemetry

NOW = 1_800_000_000.0
RULES = AlertRules()
DISK = {"disk_total_bytes": 100, "disk_free_bytes": 50}


def node(presence="online", last_seen=NOW, facts=None, pipelines=None, shop="s1", name="n1"):
    return NodeSnapshot(shop, name, presence, last_seen, facts if facts is not None else DISK, pipelines or {})


def fridge(value, source="fridge-1", name="temperature_c"):
    return ReadingSnapshot("s1", "n1", source, name, value, NOW)


def cam(fps, state="running"):
    return {"cam-1": {"kind": "vision", "state": state, "fps": fps}}


# ----- rules --------------------------------------------------------------------------------------


def test_defaults_from_empty_file():
    assert parse_rules("") == AlertRules()
    assert parse_rules("node_offline: {after_s: 60}").node_offline.after_s == 60


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("node_ofline: {after_s: 60}", "key 'node_ofline': remove it or check its spelling", id="typo-key"),
        pytest.param("fridge_warm: {max_c: 5, clear_below_c: 6}", "clear_below_c must be at most max_c", id="hysteresis-inverted"),
        pytest.param("camera_fps_low: {min_fps: -1}", "camera_fps_low.min_fps", id="negative"),
        pytest.param("webhook: {url: ftp://x}", "http:// or https://", id="webhook-scheme"),
        pytest.param("[1, 2]", "must be a mapping", id="not-a-mapping"),
        pytest.param("a: [", "not valid YAML", id="bad-yaml"),
    ],
)
def test_bad_rules_name_source_key_and_fix(text, message):
    with pytest.raises(RulesError, match="rules.yaml") as exc:
        parse_rules(text, "rules.yaml")
    assert message in str(exc.value)


def test_load_rules_missing_file(tmp_path):
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "nope.yaml")
    (tmp_path / "r.yaml").write_text("disk_low: {min_free_percent: 20}\n")
    assert load_rules(tmp_path / "r.yaml").disk_low.min_free_percent == 20


@given(st.text(max_size=200))
def test_parse_rules_raises_only_rules_error(text):
    with contextlib.suppress(RulesError):
        parse_rules(text)


# ----- evaluator ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snapshot", "pending", "expected_rules"),
    [
        pytest.param(FleetSnapshot((node(),)), {}, [], id="healthy"),
        pytest.param(FleetSnapshot((node("offline", NOW - 301),)), {}, ["node_offline"], id="offline-past-threshold"),
        pytest.param(FleetSnapshot((node("stale", NOW - 400),)), {}, ["node_offline"], id="stale-long-counts"),
        pytest.param(FleetSnapshot((node("offline", NOW - 100),)), {}, [], id="offline-too-recent"),
        pytest.param(FleetSnapshot((node("offline", NOW - 301, pipelines=cam(0)),)), {}, ["node_offline"], id="offline-suppresses-symptoms"),
        pytest.param(FleetSnapshot((node(pipelines=cam(2.0)),)), {}, [], id="fps-low-just-started"),
        pytest.param(FleetSnapshot((node(pipelines=cam(2.0)),)), {alert_key("camera_fps_low", "s1", "n1", "cam-1"): NOW - 120},
                     ["camera_fps_low"], id="fps-low-held"),
        pytest.param(FleetSnapshot((node(pipelines=cam(None, "failed")),)), {alert_key("camera_fps_low", "s1", "n1", "cam-1"): NOW - 500},
                     ["camera_fps_low"], id="failed-pipeline-is-zero-fps"),
        pytest.param(FleetSnapshot((node(pipelines=cam(15.0)),)), {alert_key("camera_fps_low", "s1", "n1", "cam-1"): NOW - 500}, [],
                     id="fps-recovered"),
        pytest.param(FleetSnapshot((node(facts={"disk_total_bytes": 100, "disk_free_bytes": 5}),)), {}, ["disk_low"], id="disk-low"),
        pytest.param(FleetSnapshot((node(facts={**DISK, "clock_offset_s": -3.5}),)), {}, ["clock_skew"], id="clock-skew"),
        pytest.param(FleetSnapshot((node(facts={**DISK, "clock_offset_s": 1.0}),)), {}, [], id="clock-ok"),
        pytest.param(FleetSnapshot(readings=(fridge(9.0),)), {alert_key("fridge_warm", "s1", "n1", "fridge-1"): NOW - 600},
                     ["fridge_warm"], id="fridge-warm-held"),
        pytest.param(FleetSnapshot(readings=(fridge(9.0, source="shelf-3"),)), {alert_key("fridge_warm", "s1", "n1", "shelf-3"): NOW - 900},
                     [], id="not-a-fridge"),
        pytest.param(FleetSnapshot(node_alerts=(NodeRaised("s1", "n1", "board_lost", "arduino-1", "firing", "critical", "USB gone"),)), {},
                     ["node:board_lost"], id="node-raised-firing"),
        pytest.param(FleetSnapshot(node_alerts=(NodeRaised("s1", "n1", "board_lost", "arduino-1", "resolved", "critical", ""),)), {},
                     [], id="node-raised-resolved"),
    ],
)
def test_evaluate_table(snapshot, pending, expected_rules):
    result = evaluate(snapshot, RULES, NOW, pending=pending)
    assert sorted(f.rule for f in result.firing) == expected_rules


@pytest.mark.parametrize(
    ("value", "active", "fires"),
    [
        pytest.param(8.5, False, True, id="above-max-fires"),
        pytest.param(7.5, False, False, id="in-band-does-not-open"),
        pytest.param(7.5, True, True, id="in-band-stays-firing"),
        pytest.param(6.9, True, False, id="below-clear-resolves"),
    ],
)
def test_fridge_hysteresis(value, active, fires):
    key = alert_key("fridge_warm", "s1", "n1", "fridge-1")
    rules = parse_rules("fridge_warm: {max_c: 8, clear_below_c: 7, for_s: 0}")
    result = evaluate(FleetSnapshot(readings=(fridge(value),)), rules, NOW, frozenset({key}) if active else frozenset())
    assert bool(result.firing) is fires


def test_pending_timer_is_carried_and_dropped():
    snap = FleetSnapshot((node(pipelines=cam(1.0)),))
    first = evaluate(snap, RULES, NOW)
    assert not first.firing and list(first.pending.values()) == [NOW]
    later = evaluate(snap, RULES, NOW + 120, pending=first.pending)
    assert [f.rule for f in later.firing] == ["camera_fps_low"]
    healed = evaluate(FleetSnapshot((node(pipelines=cam(20.0)),)), RULES, NOW + 130, pending=later.pending)
    assert healed.pending == {}


def test_disabled_rule_does_not_fire():
    rules = parse_rules("node_offline: {enabled: false}")
    assert not evaluate(FleetSnapshot((node("offline", NOW - 9999),)), rules, NOW).firing


@given(st.lists(st.tuples(st.sampled_from(["online", "stale", "offline", "unknown"]), st.floats(0, 10_000),
                          st.floats(-100, 100), st.integers(0, 100)), max_size=20))
def test_evaluate_keys_are_unique_and_deterministic(nodes):
    snap = FleetSnapshot(tuple(
        NodeSnapshot("s1", f"n{i}", p, NOW - age, {"disk_total_bytes": 100, "disk_free_bytes": free, "clock_offset_s": off}, {})
        for i, (p, age, off, free) in enumerate(nodes)
    ))
    a = evaluate(snap, RULES, NOW)
    keys = [f.key for f in a.firing]
    assert len(keys) == len(set(keys))
    assert a == evaluate(snap, RULES, NOW)


# ----- store on both engines -------------------------------------------------------------------------


def firing(rule="disk_low", node_="n1", summary="x", value=1.0):
    from fleet_controller.alerts.evaluator import Firing

    return Firing(alert_key(rule, "s1", node_), rule, "s1", node_, "", "warning", summary, value)


def test_sync_dedupes_updates_and_resolves(registry):
    e = registry.engine
    ch = store.sync(e, [firing()], NOW)
    assert [a.rule for a in ch.opened] == ["disk_low"] and not ch.resolved
    ch = store.sync(e, [firing(summary="y", value=2.0)], NOW + 10)
    assert not ch.opened and not ch.resolved
    [a] = store.list_alerts(e, NOW + 10)
    assert (a.summary, a.value, a.started_at, a.updated_at) == ("y", 2.0, NOW, NOW + 10)
    ch = store.sync(e, [], NOW + 20)
    assert [a.key for a in ch.resolved] == [firing().key]
    assert store.list_alerts(e, NOW + 20) == []
    assert store.list_alerts(e, NOW + 20, state="resolved")[0].resolved_at == NOW + 20
    ch = store.sync(e, [firing()], NOW + 30)  # comes back: a new alert
    assert len(ch.opened) == 1 and ch.opened[0].id != a.id


def test_ack_and_silence(registry):
    e = registry.engine
    [a] = store.sync(e, [firing()], NOW).opened
    assert a.status == "firing"
    assert store.acknowledge(e, a.id, "olga", NOW + 1).status == "acknowledged"
    assert store.acknowledge(e, a.id, "other", NOW + 2).acked_by == "olga"
    s = store.silence(e, a.id, "olga", 3600, NOW + 3, "known")
    assert s.status == "silenced" and s.silenced_until == NOW + 3603
    assert store.list_alerts(e, NOW + 3700)[0].silenced_until is None  # the silence ran out
    with pytest.raises(store.AlertNotFound):
        store.acknowledge(e, 999, "olga", NOW)


# ----- worker over the registry -----------------------------------------------------------------------


def test_worker_opens_and_resolves_from_registry_state(registry):
    registry.write_batch(batch(presence(shop="s1", node="n1"), heartbeat(shop="s1", node="n1", seq=1), at=NOW), NOW)
    registry.write_batch(batch(telemetry(shop="s1", node="n1", seq=2, value=12.0, ts=NOW), node_alert(shop="s1", node="n1", seq=3),
                               at=NOW), NOW)
    mreg = CollectorRegistry()
    clock = [NOW]
    published = []
    rules = parse_rules("fridge_warm: {for_s: 60}\nresolve_after_s: 0")
    w = AlertWorker(RegistryReader(registry.engine), rules, AlertMetrics(mreg), clock=lambda: clock[0], publish=lambda t, d: published.append((t, d)))
    ch = w.evaluate_once()
    assert [a.rule for a in ch.opened] == ["node:fridge_warm"]  # raised by the node itself; ours waits for_s
    clock[0] = NOW + 61
    ch = w.evaluate_once()
    assert [a.rule for a in ch.opened] == ["fridge_warm"]
    assert mreg.get_sample_value("shopfleet_alerts_firing", {"rule": "fridge_warm", "severity": "critical"}) == 1
    registry.write_batch(batch(telemetry(shop="s1", node="n1", seq=4, value=3.0, ts=NOW + 62), node_alert(shop="s1", node="n1", seq=5, state="resolved"),
                               at=NOW + 62), NOW + 62)
    clock[0] = NOW + 70
    ch = w.evaluate_once()
    assert sorted(a.rule for a in ch.resolved) == ["fridge_warm", "node:fridge_warm"]
    assert mreg.get_sample_value("shopfleet_alerts_resolved_total", {"rule": "fridge_warm"}) == 1
    assert mreg.get_sample_value("shopfleet_alerts_firing", {"rule": "fridge_warm", "severity": "critical"}) is None


async def test_worker_survives_a_broken_database(tmp_path):
    from fleet_controller.registry.db import create_engine

    engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")  # no tables: every query fails
    mreg = CollectorRegistry()
    w = AlertWorker(RegistryReader(engine), AlertRules(), AlertMetrics(mreg))
    async with httpx.AsyncClient() as client:
        assert await w.tick(client) is None
        assert await w.tick(client) is None
    assert mreg.get_sample_value("shopfleet_alerts_evaluation_errors_total", {"reason": "database"}) == 2


# ----- webhook against a real HTTP server --------------------------------------------------------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.headers.get("Authorization"), json.loads(body)))
        status = self.server.statuses.pop(0) if self.server.statuses else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    srv.received, srv.statuses = [], []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


async def test_webhook_retries_then_delivers(receiver, registry):
    receiver.statuses = [503]
    [a] = store.sync(registry.engine, [firing()], NOW).opened
    mreg = CollectorRegistry()
    m = AlertMetrics(mreg)
    cfg = Webhook(url=f"http://127.0.0.1:{receiver.server_port}/hook", headers={"Authorization": "Bearer abc"})
    async with httpx.AsyncClient() as client:
        assert await send(client, cfg, a, m, "http://dash", base_delay_s=0.01)
    assert len(receiver.received) == 2
    auth, body = receiver.received[-1]
    assert auth == "Bearer abc"
    assert body["status"] == "firing" and body["labels"]["alertname"] == "disk_low" and body["generatorURL"] == "http://dash/shops/s1"
    assert mreg.get_sample_value("shopfleet_alerts_webhook_sent_total") == 1


async def test_webhook_failure_is_counted_not_raised(registry):
    from shopfleet.broker import free_port

    [a] = store.sync(registry.engine, [firing()], NOW).opened
    mreg = CollectorRegistry()
    cfg = Webhook(url=f"http://127.0.0.1:{free_port()}/hook", retries=1, timeout_s=1)
    async with httpx.AsyncClient() as client:
        assert not await send(client, cfg, a, AlertMetrics(mreg), base_delay_s=0.01)
    assert mreg.get_sample_value("shopfleet_alerts_webhook_failures_total", {"reason": "connect"}) == 1


async def test_worker_sends_opened_and_resolved_to_the_webhook_but_not_silenced(receiver, registry):
    registry.write_batch(batch(presence(shop="s1", node="n1"), heartbeat(shop="s1", node="n1", seq=1, facts=heartbeat().facts.model_copy(
        update={"disk_free_bytes": 1 << 20})), at=NOW), NOW)
    clock = [NOW]
    rules = parse_rules(f"webhook: {{url: 'http://127.0.0.1:{receiver.server_port}/h'}}\nnode_alerts: {{enabled: false}}\nresolve_after_s: 0")
    w = AlertWorker(RegistryReader(registry.engine), rules, AlertMetrics(CollectorRegistry()), clock=lambda: clock[0], webhook_base_delay_s=0.01)
    async with httpx.AsyncClient() as client:
        ch = await w.tick(client)
        assert [a.rule for a in ch.opened] == ["disk_low"]
        await w.flush()
        assert [b["status"] for _, b in receiver.received] == ["firing"]
        store.silence(registry.engine, ch.opened[0].id, "olga", 3600, NOW)
        registry.write_batch(batch(heartbeat(shop="s1", node="n1", seq=2), at=NOW + 1), NOW + 1)  # disk freed
        clock[0] = NOW + 2
        ch = await w.tick(client)
        assert [a.rule for a in ch.resolved] == ["disk_low"] and ch.resolved[0].silenced_until
        await w.flush()
    assert [b["status"] for _, b in receiver.received] == ["firing"]  # the silenced resolution was not sent

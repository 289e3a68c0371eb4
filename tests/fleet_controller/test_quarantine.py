"""No message can stall the intake: the hostile messages of issue 10 (findings 1 and 4) against a running
controller (real Mosquitto, real intake with the writer process), the dead-letter API, and the event API
on a row stored before the protocol had bounds."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from edge_agent.protocol import Event, Topics, encode
from fleet_controller.intake.core import IntakeCore, RegistryWriter, SeqLimits
from fleet_controller.registry.read import NotFound
from fleet_controller.registry.store import NodeUpdate, SeqCursor, WriteBatch
from fleet_controller.web.app import create_app
from tests.support.controller import (
    Node,
    RunningController,
    controller_settings,
    event,
    heartbeat,
    presence,
    role_users,
)
from tests.support.payloads import nested
from tests.support.wait import wait_for


def _raw_event(seq: int, epoch: str = "ep1", **extra) -> bytes:
    """An event payload built by hand, as an attacker would (no model validation on the way)."""
    body = {"v": 1, "ts": time.time(), "shop": "shop-a", "node": "pi-1", "epoch": epoch, "seq": seq, "kind": "event",
            "type": "door_opened", "source": "door-1", "data": {"n": seq}}
    body.update(extra)
    return json.dumps(body).encode()


def _watermark(rc: RunningController, shop: str = "shop-a") -> int:
    try:
        return rc.service.reader.get_node(shop, "pi-1").watermark
    except NotFound:
        return -1


def _stored_events(rc: RunningController) -> list[tuple[str, int]]:
    return sorted((e.data.get("n"), e.seq) for e in rc.service.reader.list_events("shop-a", kind="event", limit=1000))


def test_hostile_messages_of_one_node_never_stall_the_fleet(broker, tmp_path):
    rc = RunningController(controller_settings(broker, tmp_path))  # writer: a child process (the default)
    attacker = Node(broker, "shop-a", "pi-1", will=False)
    good = Node(broker, "shop-b", "pi-1", will=False)
    try:
        assert rc.service.writer.mode == "process"
        topic = Topics.node("shop-a", "pi-1", "events")
        attacker.send(presence("shop-a", "pi-1", session=5))
        for seq in (1, 2, 3):
            attacker.send(_raw_event(seq), topic)
        wait_for(lambda: len(_stored_events(rc)) == 3, timeout=20, what="the attacker node's three real events")
        good_seq = 0

        def beat() -> None:
            nonlocal good_seq
            good_seq += 1
            good.send(heartbeat("shop-b", "pi-1", seq=good_seq))

        hostile = [
            # finding 1: 900 levels of data (5.6 KB), 20 times, with a second epoch in the same stream
            *[_raw_event(4, data=nested(900)) for _ in range(10)],
            _raw_event(1, epoch="ep2"),
            *[_raw_event(4, data=nested(900)) for _ in range(10)],
            _raw_event(5, data=nested(300)),  # the depth that made the event API answer 500
            # finding 6: NaN and Infinity
            _raw_event(6).replace(b'"n": 6', b'"n": NaN'),
            _raw_event(6).replace(b'"n": 6', b'"n": Infinity'),
            # finding 4: a seq jump of 10^9, a seq reset in the same epoch, the real next one, an epoch flip and back
            _raw_event(10**9, epoch="ep2"),
            _raw_event(1, epoch="ep2"),
            _raw_event(2, epoch="ep2"),
            _raw_event(1, epoch="ep3"),
            _raw_event(3, epoch="ep2"),
            _raw_event(1, epoch="ep1"),
        ]
        for payload in hostile:
            attacker.send(payload, topic)
            beat()
        attacker.send(presence("shop-a", "pi-1", session=10**9))  # an absurd session
        beat()
        attacker.send(_raw_event(2, epoch="ep3"), topic)  # the newest epoch goes on
        last = good_seq
        beat()
        wait_for(lambda: _watermark(rc, "shop-b") == last + 1, timeout=30,
                 what="every heartbeat of the good node stored while the hostile ones arrived")
        wait_for(lambda: _watermark(rc) == 2, timeout=10, what="the attacker's newest-epoch event")
        good_node = rc.service.reader.get_node("shop-b", "pi-1")
        assert (good_node.messages_total, good_node.missing_total, good_node.presence) == (last + 1, 0, "online")
        # Nothing stored twice: ep1 1-3, ep2 1-2, ep3 1-2, each once; none of the hostile ones.
        assert _stored_events(rc) == [(1, 1), (1, 1), (1, 1), (2, 2), (2, 2), (2, 2), (3, 3)]
        node = rc.service.reader.get_node("shop-a", "pi-1")
        assert (node.epoch, node.watermark, node.missing_total, node.session) == ("ep3", 2, 0, 5)
        m = rc.metric
        assert m("shopfleet_controller_rejected_total", reason="schema") == 21  # 20 x 900 levels, 1 x 300 levels
        assert m("shopfleet_controller_rejected_total", reason="not_finite") == 2
        assert m("shopfleet_controller_rejected_total", reason="seq_jump") == 1
        assert m("shopfleet_controller_rejected_total", reason="stale_epoch") == 2
        assert m("shopfleet_controller_rejected_total", reason="session_jump") == 1
        assert m("shopfleet_controller_duplicates_total") == 1
        assert m("shopfleet_controller_gaps_total") == 0
        assert m("shopfleet_controller_store_errors_total", kind="unexpected") == 0
        assert m("shopfleet_controller_store_errors_total", kind="temporary") == 0
        assert rc.service.health()["status"] == "ok"
        assert httpx.get(f"{rc.service.api_url}/healthz").status_code == 200
    finally:
        attacker.close()
        good.close()
        rc.stop()


def test_a_message_the_database_refuses_is_quarantined_live_and_listed(broker, tmp_path, postgres_url):
    """On PostgreSQL a NUL in a text field cannot be stored: the message is quarantined, the stream goes on."""
    rc = RunningController(controller_settings(broker, tmp_path, db_url=postgres_url))
    n = Node(broker, "shop-a", "pi-1", will=False)
    try:
        n.send(event(seq=1))
        n.send(event(seq=2, type="door\x00opened"))
        n.send(event(seq=3))
        wait_for(lambda: _watermark(rc) == 3, timeout=20, what="the stream past the bad row")
        wait_for(lambda: rc.metric("shopfleet_controller_quarantined_total", reason="store") == 1, timeout=10, what="the quarantine count")
        items, total = rc.service.reader.list_quarantine()
        assert total == 1 and items[0].reason == "store" and "NUL" in items[0].error
        assert [e.seq for e in rc.service.reader.list_events("shop-a", kind="event")] == [3, 1]
        assert rc.service.intake.quarantined_total == 1
    finally:
        n.close()
        rc.stop()


def test_a_nul_on_postgresql_is_quarantined_up_front_without_splitting_its_batch(postgres_url, monkeypatch):
    """One unstorable message must not make its batch fail and go again message by message (every good one waiting)."""
    from fleet_controller.intake.core import NUL_ERROR, has_nul_escape
    from fleet_controller.registry import migrations
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.read import RegistryReader
    from fleet_controller.registry.store import RegistryStore

    assert has_nul_escape(b'{"a": "x\\u0000"}') and has_nul_escape(b'{"a": "\\\\\\u0000"}')
    assert not has_nul_escape(b'{"a": "\\\\u0000"}')  # an escaped backslash, then the text u0000
    engine = create_engine(postgres_url)
    migrations.upgrade(engine)
    registry = RegistryStore(engine)
    writes: list[int] = []
    real = registry.write_batch
    monkeypatch.setattr(registry, "write_batch", lambda wb, now=None: writes.append(len(wb.uplinks)) or real(wb, now))
    core = IntakeCore(registry)
    topic = Topics.node("shop-a", "pi-1", "events")
    batch = [(topic, encode(event(seq=s)), time.time()) for s in (1, 2)]
    batch.insert(1, (topic, encode(event(seq=3, type="door\x00opened")), time.time()))
    batch.append((topic, _raw_event(4, data={"note": "C:\\u0000dir"}), time.time()))  # the text \u0000, no NUL: stored
    out = core.process_batch(batch, limits=SeqLimits(acks=True))
    assert writes == [3], "one write of the three storable messages, no message-by-message retry"
    assert dict(out.quarantined) == {"store": 1} and out.stored == 3
    reader = RegistryReader(engine)
    items, total = reader.list_quarantine()
    assert total == 1 and items[0].error == NUL_ERROR and "\\u0000" in items[0].payload and items[0].node == "pi-1"
    # Its seq was received: no gap, and the stored-ack covers it (an agent stops sending it again).
    node = reader.get_node("shop-a", "pi-1")
    assert (node.watermark, node.gaps, node.missing_total, node.messages_total) == (4, [], 0, 3)
    assert [a[2:] for a in out.acks] == [("ep1", 4, ())]
    # Sent again anyway: a duplicate like any other, not quarantined twice.
    again = core.process_batch([batch[1]])
    assert (again.duplicates, dict(again.quarantined)) == (1, {})
    assert reader.list_quarantine()[1] == 1
    engine.dispose()


def test_a_message_that_fails_alone_is_quarantined_with_its_seq_received(registry, reader, monkeypatch):
    """Quarantined is not missing: no gap, the stored-ack covers it, and sent again it is a duplicate, not a second row."""
    from sqlalchemy.exc import DataError

    real = registry.write_batch

    def refuse_seq_2(wb, now=None):
        if any(m.seq == 2 for m, _ in wb.uplinks):
            raise DataError("INSERT ...", {}, Exception("value out of range for this column"))
        return real(wb, now)

    monkeypatch.setattr(registry, "write_batch", refuse_seq_2)
    core = IntakeCore(registry)
    topic = Topics.node("shop-a", "pi-1", "events")
    batch = [(topic, encode(event(seq=s)), time.time()) for s in (1, 2, 3)]
    out = core.process_batch(batch, limits=SeqLimits(acks=True))
    assert (out.stored, dict(out.quarantined)) == (2, {"store": 1})
    items, total = reader.list_quarantine()
    assert total == 1 and items[0].reason == "store" and "value out of range" in items[0].error
    node = reader.get_node("shop-a", "pi-1")
    assert (node.watermark, node.gaps, node.missing_total, node.messages_total) == (3, [], 0, 2)
    again = core.process_batch([batch[1]], limits=SeqLimits(acks=True))
    assert (again.duplicates, dict(again.quarantined)) == (1, {})
    assert [a[2:] for a in again.acks] == [("ep1", 3, ())]  # the node may forget seq 2
    assert reader.list_quarantine()[1] == 1


# ----- the dead-letter API ------------------------------------------------------------------------


@pytest.fixture
def role_clients(registry, reader, metrics, db_url):
    from argon2 import PasswordHasher

    from fleet_controller.web.accounts.store import AccountStore
    from fleet_controller.web.accounts.web import build_auth

    store = AccountStore(registry.engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    role_users(store)
    auth = build_auth(store, metrics.registry)
    writer = RegistryWriter(db_url, mode="thread")
    app = create_app(reader, metrics.registry, writer=writer, routers=[auth.router], dependencies=[auth.dependency])
    clients = {}
    with TestClient(app) as base:
        for user in ("viewer", "operator", "mlops", "admin"):
            c = TestClient(app)
            c.headers["Authorization"] = f"Bearer {store.create_token(user, 'q-tests')}"
            clients[user] = c
        yield clients
        del base
    writer.close()


def test_quarantine_api_pages_filters_and_is_for_operators_and_admins(role_clients, registry):
    core = IntakeCore(registry)
    for i in range(5):
        topic = Topics.node("shop-a" if i % 2 else "shop-b", "pi-1", "events")
        core.quarantine([(topic, b'{"x": %d}' % i, 1000.0 + i)], "store" if i < 4 else "writer", f"error {i}")
    core.quarantine([("fleet/v1/Bad Topic", b"\xff" * 70_000, 2000.0)], "unexpected", "boom")
    admin = role_clients["admin"]
    page = admin.get("/api/v1/quarantine", params={"limit": 2}).json()
    assert (page["total"], page["limit"], len(page["items"])) == (6, 2, 2)
    newest = page["items"][0]
    assert (newest["reason"], newest["shop"], newest["payload_bytes"], newest["truncated"]) == ("unexpected", None, 70_000, True)
    assert len(newest["payload"]) == 64 * 1024
    second = admin.get("/api/v1/quarantine", params={"limit": 2, "offset": 2}).json()["items"]
    assert [i["error"] for i in second] == ["error 3", "error 2"]
    assert admin.get("/api/v1/quarantine", params={"reason": "writer"}).json()["total"] == 1
    only_a = admin.get("/api/v1/quarantine", params={"shop": "shop-a"}).json()
    assert only_a["total"] == 2 and {i["shop"] for i in only_a["items"]} == {"shop-a"}
    assert role_clients["operator"].get("/api/v1/quarantine").status_code == 200
    assert role_clients["viewer"].get("/api/v1/quarantine").status_code == 403
    assert role_clients["mlops"].get("/api/v1/quarantine").status_code == 403
    assert admin.get("/api/v1/quarantine", params={"limit": 501}).status_code == 422


def test_the_event_api_renders_a_page_holding_a_deep_event_stored_before_the_bounds(api_client, registry):
    deep = Event.model_construct(shop="shop-a", node="pi-1", epoch="ep1", seq=2, ts=time.time(), v=1, kind="event",
                                 type="door_opened", source="door-1", at=None, data=nested(300))
    wb = WriteBatch()
    for msg in (event(seq=1), deep, event(seq=3)):
        wb.uplinks.append((msg, time.time()))
    wb.seen[("shop-a", "pi-1")] = time.time()
    wb.nodes[("shop-a", "pi-1")] = NodeUpdate(SeqCursor("ep1", 3), messages=3)
    registry.write_batch(wb)
    r = api_client.get("/api/v1/shops/shop-a/events", params={"kind": "event"})
    assert r.status_code == 200
    by_seq = {e["seq"]: e["data"] for e in r.json()}
    assert by_seq[1] == {"n": 1} and by_seq[3] == {"n": 3}
    assert "nests deeper than 8 levels" in by_seq[2]["_unreadable"]
    assert encode(event(seq=1))  # the normal path is untouched

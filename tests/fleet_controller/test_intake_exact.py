"""Exact intake (issue 15): evictions counted apart from gaps, replicas sharing one registry, stored-acks.

Two :class:`IntakeCore` values on one database stand for two controller replicas: each keeps its
own in-memory cursors, which is exactly what made replicas store duplicates and miscount before
the cursor rows carried a revision.
"""

from __future__ import annotations

import random

import pytest
from sqlalchemy import func, select

from edge_agent.protocol import EvictedRun
from fleet_controller.intake.core import IntakeCore, SeqLimits, drop_evicted, record, stored_ack
from fleet_controller.intake.mqtt import InboundMessage
from fleet_controller.registry.store import EVENTS, HEARTBEATS, SeqCursor
from tests.support.controller import event, heartbeat, inbound, value

ACKS = SeqLimits(acks=True)


def run(seqs: tuple[int, int], priority: str = "telemetry") -> EvictedRun:
    return EvictedRun(first=seqs[0], last=seqs[1], priority=priority)  # type: ignore[arg-type]


def test_drop_evicted_removes_only_open_gap_seqs():
    cur = SeqCursor("ep1", 20, ((3, 5), (8, 12)))
    new, removed = drop_evicted(cur, [run((4, 9)), run((11, 11), "important"), run((15, 30))])
    assert new.gaps == ((3, 3), (10, 10), (12, 12))
    assert removed == {"telemetry": 4, "important": 1}  # 4, 5, 8, 9; 15..30 were stored or are above the watermark
    assert drop_evicted(new, [run((15, 16))])[0] is new


def test_stored_ack_never_claims_an_unlisted_gap():
    gaps = tuple((i * 10, i * 10 + 1) for i in range(1, 80))
    seq, missing = stored_ack(SeqCursor("ep1", 1000, gaps))
    assert len(missing) == 64 and seq == gaps[64][0] - 1
    assert stored_ack(SeqCursor("ep1", 7, ((2, 3),))) == (7, ((2, 3),))


def test_evicted_seqs_are_counted_apart_from_missing(registry, metrics, reader):
    core = IntakeCore(registry)
    # 1..3 stored, 4..9 evicted at the agent (6 telemetry, of which 7 a keeper), 10 a heartbeat reporting them.
    out = core.process_batch([inbound(heartbeat(seq=s)) for s in (1, 2, 3)])
    record(metrics, out)
    hb = heartbeat(seq=10, evicted=(run((4, 6)), run((7, 7), "keeper"), run((8, 9))))
    out = core.process_batch([inbound(hb)], limits=ACKS)
    record(metrics, out)
    assert out.missing == 6 and dict(out.evicted) == {"telemetry": 5, "keeper": 1}
    node = reader.get_node("shop-a", "pi-1")
    assert (node.watermark, node.open_gaps, node.missing_total, node.evicted_total) == (10, 0, 0, 6)
    assert value(metrics, "shopfleet_controller_evicted_total", priority="telemetry") == 5
    assert value(metrics, "shopfleet_controller_evicted_total", priority="keeper") == 1
    assert out.acks == (("shop-a", "pi-1", "ep1", 10, ()),)
    # The same heartbeat again (a redelivery) changes nothing; a late "evicted" seq is a duplicate, not a fill.
    out = core.process_batch([inbound(hb), inbound(heartbeat(seq=5))])
    assert (out.stored, out.duplicates, out.filled, out.evicted) == (0, 2, 0, ())
    node = reader.get_node("shop-a", "pi-1")
    assert (node.open_gaps, node.missing_total, node.evicted_total) == (0, 0, 6)


def test_evictions_and_real_loss_are_told_apart(registry, reader):
    core = IntakeCore(registry)
    core.process_batch([inbound(heartbeat(seq=1))])
    # 2..5 lost on the way (the broker dropped them), 6..8 evicted; the heartbeat 9 reports only 6..8.
    core.process_batch([inbound(heartbeat(seq=9, evicted=(run((6, 8)),)))])
    node = reader.get_node("shop-a", "pi-1")
    assert (node.open_gaps, node.missing_total, node.evicted_total, node.gaps) == (4, 4, 3, [[2, 5]])


def _stored(registry) -> list[tuple[str, int]]:
    with registry.engine.connect() as conn:
        rows = list(conn.execute(select(HEARTBEATS.c.epoch, HEARTBEATS.c.seq)))
        rows += list(conn.execute(select(EVENTS.c.epoch, EVENTS.c.seq).where(EVENTS.c.kind == "event")))
    return sorted((e, int(s)) for e, s in rows)


def test_two_replicas_never_store_twice_and_count_exactly(registry, metrics, reader):
    """Messages of one node split between two replicas, reordered and redelivered to either one."""
    a, b = IntakeCore(registry), IntakeCore(registry)
    rng = random.Random(15)
    n = 300
    msgs = [inbound(heartbeat(seq=s) if s % 3 else event(seq=s)) for s in range(1, n + 1)]
    # Each message goes to a random replica, some twice (a redelivery after a replica died before acking).
    deliveries = [(rng.choice((a, b)), m) for m in msgs] + [(rng.choice((a, b)), m) for m in rng.sample(msgs, 60)]
    rng.shuffle(deliveries)
    conflicts = 0
    for i in range(0, len(deliveries), 7):
        for core in (a, b):
            part = [m for c, m in deliveries[i:i + 7] if c is core]
            if part:
                out = core.process_batch(part)
                record(metrics, out)
                conflicts += out.cursor_conflicts
    assert _stored(registry) == [("ep1", s) for s in range(1, n + 1)]
    node = reader.get_node("shop-a", "pi-1")
    assert (node.watermark, node.open_gaps, node.missing_total) == (n, 0, 0)
    assert (node.messages_total, node.duplicates_total) == (n, 60)
    assert value(metrics, "shopfleet_controller_duplicates_total") == 60
    assert conflicts > 0  # the replicas really did race on the cursor
    assert value(metrics, "shopfleet_controller_cursor_conflicts_total") == conflicts


def test_a_replica_that_restarts_mid_stream_keeps_counts_exact(registry, reader):
    """Replica A dies after committing (before acking): B gets A's batch again and must drop it whole."""
    a, b = IntakeCore(registry), IntakeCore(registry)
    b.process_batch([inbound(heartbeat(seq=s)) for s in (1, 2)])
    a.process_batch([inbound(heartbeat(seq=s)) for s in (3, 4, 5)])  # committed, never acked: redelivered to B
    out = b.process_batch([inbound(heartbeat(seq=s)) for s in (3, 4, 5, 6)])
    assert (out.stored, out.duplicates, out.missing, out.cursor_conflicts) == (1, 3, 0, 1)
    with registry.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(HEARTBEATS)) == 6
    node = reader.get_node("shop-a", "pi-1")
    assert (node.watermark, node.open_gaps, node.missing_total, node.duplicates_total) == (6, 0, 0, 3)


def _run_intake(db_url, metrics, messages, **intake_settings):
    """Feed ``messages`` from a producer thread (the MQTT thread's role) into an Intake; return it and what it published."""
    import asyncio
    import threading

    from fleet_controller.intake.core import Intake, RegistryWriter
    from fleet_controller.settings import IntakeSettings

    published: list[tuple[str, bytes]] = []
    acked: list[object] = []
    writer = RegistryWriter(db_url, mode="thread")
    intake = Intake(writer, metrics, IntakeSettings(**intake_settings), ack=acked.append,
                    publish=lambda t, p: published.append((t, p)))

    async def main():
        task = asyncio.create_task(intake.run())
        await asyncio.sleep(0.05)
        producer = threading.Thread(target=lambda: [intake.submit(m) for m in messages])
        producer.start()
        while len(acked) < len(messages):
            await asyncio.sleep(0.02)
        await asyncio.to_thread(producer.join)
        task.cancel()

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        writer.close()
    return intake, published


def test_flow_control_bounds_the_intake_queue(registry, metrics, reader, db_url):
    n = 3000
    msgs = [inbound(heartbeat(node=f"pi-{s % 7}", seq=s // 7 + 1)) for s in range(n)]
    intake, _ = _run_intake(db_url, metrics, msgs, max_queue=100, batch_max_messages=50)
    assert intake.pauses > 0  # the producer was really held back
    assert intake.queue_high_water <= 100 + intake.pause_timeouts  # one message let in per capped pause
    assert intake.stored_total == n
    assert value(metrics, "shopfleet_controller_intake_paused") == 0


def test_stored_acks_are_published_after_commit(registry, metrics, reader, db_url):
    from edge_agent.protocol import parse_downlink

    msgs = [inbound(heartbeat(seq=s)) for s in (1, 2, 4, 5)] + [inbound(heartbeat(node="pi-2", seq=1))]
    _, published = _run_intake(db_url, metrics, msgs, ack_nodes=True)
    acks = {}
    for topic, payload in published:
        ack = parse_downlink(topic, payload)
        assert topic == f"fleet/v1/{ack.shop}/{ack.node}/ack"
        acks[(ack.node)] = ack  # the newest one per node
    assert (acks["pi-1"].seq, acks["pi-1"].missing) == (5, ((3, 3),))
    assert acks["pi-1"].covers(4) and not acks["pi-1"].covers(3)
    assert (acks["pi-2"].epoch, acks["pi-2"].seq, acks["pi-2"].missing) == ("ep1", 1, ())
    assert value(metrics, "shopfleet_controller_stored_acks_total") == len(published)


def test_stored_acks_are_coalesced_per_node_and_period(registry, metrics, reader, db_url):
    """Many batches of the same nodes: each node gets at most one ack per ACK_PERIOD_S, and its last one covers everything stored."""
    import math
    import time

    from edge_agent.protocol import parse_downlink
    from fleet_controller.intake.core import ACK_PERIOD_S

    n = 300
    msgs = [inbound(heartbeat(node=f"pi-{s % 2}", seq=s // 2 + 1)) for s in range(n)]
    t0 = time.monotonic()
    intake, published = _run_intake(db_url, metrics, msgs, ack_nodes=True, batch_max_messages=5)
    elapsed = time.monotonic() - t0
    acks: dict[str, list] = {}
    for topic, payload in published:
        ack = parse_downlink(topic, payload)
        acks.setdefault(ack.node, []).append(ack)
    assert intake.stored_total == n and set(acks) == {"pi-0", "pi-1"}
    batches = value(metrics, "shopfleet_controller_batch_messages_count")
    assert batches >= n / 5
    for seen in acks.values():
        assert len(seen) <= math.ceil(elapsed / ACK_PERIOD_S) + 1 < batches  # not one per batch
        assert [a.seq for a in seen] == sorted(a.seq for a in seen)  # cumulative, never backwards
        assert (seen[-1].seq, seen[-1].missing) == (n // 2, ())  # the last covers the whole stream


def test_flow_control_never_holds_the_network_thread_past_its_keepalive(metrics, db_url):
    """A queue that nobody drains (a stalled writer): each submit past the bound returns after PAUSE_MAX_S, so paho's
    thread can still send acks and keepalive pings (held longer, the broker drops the connection and its acks)."""
    import threading
    import time

    from fleet_controller.intake.core import PAUSE_MAX_S, Intake, RegistryWriter
    from fleet_controller.settings import IntakeSettings

    intake = Intake(RegistryWriter(db_url, mode="thread"), metrics, IntakeSettings(max_queue=10))  # never run(): nothing drains
    msgs = [inbound(heartbeat(seq=s)) for s in range(1, 13)]
    t0 = time.monotonic()
    producer = threading.Thread(target=lambda: [intake.submit(m) for m in msgs], daemon=True)
    producer.start()
    producer.join(30)
    assert not producer.is_alive()
    assert intake.pauses == intake.pause_timeouts == 2 and intake.queue_high_water == 12
    assert 2 * PAUSE_MAX_S <= time.monotonic() - t0 < 30
    assert value(metrics, "shopfleet_controller_intake_paused") == 0


def test_a_removed_node_comes_back_as_a_new_node_on_either_replica(registry, reader):
    """A node removed on one replica's writer, while the other still remembers it, is created afresh by its next message.

    The other writer holds the node as known with its cursor: its compare-and-set on the removed row
    matches nothing. Before it forgot what it knew on a conflict, it retried against the same
    memory 20 times, failed the batch, stored it again message by message, and quarantined every
    message of the node as unstorable: a node back in the fleet lost its messages on that replica.
    """
    from fleet_controller.registry.read import NotFound
    from fleet_controller.registry.store import READINGS, NodeNotRemovable, RegistryStore
    from tests.support.controller import telemetry

    a, b = IntakeCore(registry), IntakeCore(RegistryStore(registry.engine))  # two writers, each with its own memory
    b.process_batch([inbound(heartbeat(seq=1)), inbound(telemetry(seq=2)), inbound(heartbeat(node="pi-2", seq=1))])
    a.process_batch([inbound(heartbeat(seq=3))])
    event = a.remove_node("shop-a", "pi-1")
    assert (event.topic, event.shop, event.node) == ("node_removed", "shop-a", "pi-1")
    with pytest.raises(NotFound):
        reader.get_node("shop-a", "pi-1")
    with registry.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(READINGS).where(READINGS.c.node_id == "pi-1")) == 0
    assert len(_stored(registry)) == 3  # the history stays (heartbeats of pi-1 and pi-2)
    with pytest.raises(NodeNotRemovable) as info:
        a.remove_node("shop-a", "pi-1")
    assert info.value.reason == "not_found"

    out = b.process_batch([inbound(heartbeat(seq=4)), inbound(heartbeat(node="pi-2", seq=2))])  # b still knew pi-1
    assert (out.stored, out.duplicates) == (2, 0) and out.cursor_conflicts == 1
    node = reader.get_node("shop-a", "pi-1")
    # A new node, counted from here: like any node first seen mid-stream, its earlier seqs are open gaps.
    assert (node.messages_total, node.watermark, node.missing_total, out.missing) == (1, 4, 3, 3)
    assert reader.get_node("shop-a", "pi-2").messages_total == 2  # its neighbour untouched
    out = a.process_batch([inbound(heartbeat(seq=5))])  # and the writer that removed it goes on with it
    assert (out.stored, out.cursor_conflicts) == (1, 0)  # it forgot the node when removing it
    assert reader.get_node("shop-a", "pi-1").messages_total == 2


def test_a_shops_applier_is_not_removed(registry, reader):
    core = IntakeCore(registry)
    core.process_batch([inbound(heartbeat(seq=1))])
    registry.register_shop("shop-a", applier="pi-1")
    from fleet_controller.registry.store import NodeNotRemovable

    with pytest.raises(NodeNotRemovable, match="declare another applier first") as info:
        core.remove_node("shop-a", "pi-1")
    assert info.value.reason == "applier"
    assert reader.get_node("shop-a", "pi-1").messages_total == 1


def test_a_cleared_retained_presence_is_counted_apart_and_stores_nothing(registry, reader):
    """Removing a node clears its retained presence; the broker passes the empty message on to the controller."""
    from edge_agent.protocol import Topics

    core = IntakeCore(registry)
    core.process_batch([inbound(heartbeat(seq=1))])
    out = core.process_batch([InboundMessage(Topics.node("shop-a", "pi-1", "presence"), b""),
                              InboundMessage(Topics.node("shop-a", "pi-1", "telemetry"), b"")])
    assert dict(out.reasons) == {"retained_clear": 1, "bad_json": 1}  # only on a presence topic
    assert out.stored == 0 and reader.get_node("shop-a", "pi-1").presence == "online"  # unchanged by the clearing


def test_a_node_budget_allows_its_burst_then_its_rate_and_forgets_full_buckets():
    from fleet_controller.intake.core import NodeBudget

    b = NodeBudget(rate_per_s=10, burst=5)
    t = "fleet/v1/shop-a/pi-1/telemetry"
    assert [b.take(t, 100.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert b.take("fleet/v1/shop-a/pi-1/events", 100.0) is False  # one budget per node, whatever the channel
    assert b.take("fleet/v1/shop-a/pi-2/telemetry", 100.0) is True  # each node its own
    assert [b.take(t, 100.35) for _ in range(4)] == [True] * 3 + [False]  # 0.35 s at 10/s: 3.5 tokens back
    assert b.take(t, 1000.0) is True
    b.prune(1000.0 + NodeBudget.PRUNE_EVERY_S)  # both refilled long ago: forgotten
    assert len(b) == 0


def test_one_flooding_node_is_dropped_over_its_budget_and_the_others_lose_nothing(registry, metrics, reader, db_url):
    """A node that sends far past ``intake.node_burst``: its excess is acknowledged and dropped,
    counted ``rate_limited``; every message of every other node is stored."""
    flood = [inbound(heartbeat(node="rogue", seq=s)) for s in range(1, 4001)]
    honest = [inbound(heartbeat(node=f"pi-{i}", seq=s)) for s in range(1, 21) for i in range(10)]
    msgs = []
    for i, m in enumerate(flood):  # the honest nodes' messages interleaved with the flood
        msgs.append(m)
        if i % 20 == 0 and honest:
            msgs.append(honest.pop())
    msgs += honest
    intake, _ = _run_intake(db_url, metrics, msgs, batch_max_messages=50, node_burst=300, node_rate_per_s=5)
    for i in range(10):
        node = reader.get_node("shop-a", f"pi-{i}")
        assert (node.messages_total, node.missing_total) == (20, 0)
    rogue = reader.get_node("shop-a", "rogue").messages_total
    limited = value(metrics, "shopfleet_controller_rejected_total", reason="rate_limited")
    assert 300 <= rogue < 1000 and rogue + limited == 4000  # its burst and a little rate; the rest dropped, each counted
    assert intake.stored_total == 200 + rogue


def test_a_flooding_node_is_limited_through_a_real_broker_and_its_neighbour_loses_nothing(broker, tmp_path):
    """The deployed path: Mosquitto, the controller's MQTT thread, its intake and its writer process. One client floods
    10,000 valid heartbeats of its node as fast as paho sends them; a neighbour's 30 heartbeats sent meanwhile are all
    stored, and the flood beyond the budget is acknowledged, dropped and counted."""
    import threading
    import time

    import paho.mqtt.client as paho

    from edge_agent.protocol import Topics, encode
    from tests.support.controller import Node, RunningController, controller_settings
    from tests.support.wait import wait_for

    n, burst, rate = 10_000, 500, 20
    rc = RunningController(controller_settings(broker, tmp_path, intake={"node_burst": burst, "node_rate_per_s": rate}))
    flooder = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="rogue-flood")
    flooder.max_inflight_messages_set(1000)
    flooder.max_queued_messages_set(0)
    neighbour = Node(broker, "shop-a", "pi-1", will=False)
    try:
        payloads = [encode(heartbeat(node="rogue", seq=s)) for s in range(1, n + 1)]
        topic = Topics.node("shop-a", "rogue", "telemetry")
        flooder.connect("127.0.0.1", broker.port)
        flooder.loop_start()
        t0 = time.monotonic()
        sent = [flooder.publish(topic, p, qos=1) for p in payloads[:1]]
        sender = threading.Thread(target=lambda: sent.extend(flooder.publish(topic, p, qos=1) for p in payloads[1:]))
        sender.start()
        for s in range(1, 31):
            neighbour.send(heartbeat(node="pi-1", seq=s))
            time.sleep(0.02)
        reader = rc.service.reader
        wait_for(lambda: reader.get_node("shop-a", "pi-1").messages_total == 30, 60, "the neighbour's 30 heartbeats stored")
        sender.join(120)
        wait_for(lambda: all(i.is_published() for i in sent), 120, "every flood message acknowledged by the broker")
        limited = lambda: rc.metric("shopfleet_controller_rejected_total", reason="rate_limited")  # noqa: E731
        wait_for(lambda: reader.get_node("shop-a", "rogue").messages_total + limited() == n, 120,
                 "every flood message stored or dropped")
        elapsed = time.monotonic() - t0
        rogue = reader.get_node("shop-a", "rogue").messages_total
        assert burst <= rogue <= burst + rate * elapsed + 1000, (rogue, elapsed)  # (a batch in flight as the intake fell behind)
        assert limited() >= n - burst - rate * elapsed - 1000
        node = reader.get_node("shop-a", "pi-1")
        assert (node.messages_total, node.missing_total) == (30, 0)
    finally:
        flooder.loop_stop()
        flooder.disconnect()
        neighbour.close()
        rc.stop()

"""Exact intake (issue 15): evictions counted apart from gaps, replicas sharing one registry, stored-acks.

Two :class:`IntakeCore` values on one database stand for two controller replicas: each keeps its
own in-memory cursors, which is exactly what made replicas store duplicates and miscount before
the cursor rows carried a revision.
"""

from __future__ import annotations

import random

from sqlalchemy import func, select

from edge_agent.protocol import EvictedRun
from fleet_controller.intake.core import IntakeCore, SeqLimits, drop_evicted, record, stored_ack
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

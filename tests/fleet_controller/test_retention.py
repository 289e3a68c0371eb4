"""Incremental retention (issue #15) on SQLite and PostgreSQL: exact count bounds, chunked progress, the age bound."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from fleet_controller.registry import store as store_mod
from fleet_controller.registry.store import EVENTS, HEARTBEATS
from fleet_controller.settings import RetentionSettings
from tests.support.controller import T0, batch, event, heartbeat

LONG = 10**7  # an age bound no test row reaches


def write_rounds(registry, nodes, rounds, start=0, at=T0):
    """Write ``rounds`` heartbeats of every node in ``nodes`` ((shop, node) pairs), one batch per round."""
    for i in range(start + 1, start + rounds + 1):
        registry.write_batch(batch(*(heartbeat(shop=s, node=n, seq=i) for s, n in nodes), at=at + i), at + i)


def counts(registry, table=HEARTBEATS):
    """Rows per node (heartbeats) or per shop (events)."""
    part = (table.c.shop_id, table.c.node_id) if table is HEARTBEATS else (table.c.shop_id,)
    with registry.engine.connect() as conn:
        return {tuple(r[:-1]): r[-1] for r in conn.execute(select(*part, func.count()).group_by(*part))}


def seqs(registry, key):
    with registry.engine.connect() as conn:
        q = select(HEARTBEATS.c.seq).where(HEARTBEATS.c.shop_id == key[0], HEARTBEATS.c.node_id == key[1]).order_by(HEARTBEATS.c.seq)
        return list(conn.scalars(q))


NODES12 = [(f"shop-{s}", f"pi-{n}") for s in "abc" for n in range(4)]


def test_every_node_keeps_exactly_its_newest_heartbeats(registry):
    write_rounds(registry, NODES12, 8)
    deleted = registry.enforce_retention(RetentionSettings(heartbeats_per_node=5, heartbeat_max_age_s=LONG), T0 + 10)
    assert deleted["heartbeats"] == 12 * 3
    assert counts(registry) == {k: 5 for k in NODES12}
    assert all(seqs(registry, k) == [4, 5, 6, 7, 8] for k in NODES12)
    # A second run finds nothing to delete and deletes nothing.
    assert registry.enforce_retention(RetentionSettings(heartbeats_per_node=5, heartbeat_max_age_s=LONG), T0 + 10)["heartbeats"] == 0


def test_events_keep_exactly_the_newest_per_shop(registry):
    for i in range(1, 7):
        registry.write_batch(batch(*(event(shop=s, node="pi-1", seq=i) for s in ("shop-a", "shop-b")), at=T0 + i), T0 + i)
    before = counts(registry, EVENTS)
    deleted = registry.enforce_retention(RetentionSettings(events_per_shop=3, event_max_age_s=LONG), T0 + 10)
    assert counts(registry, EVENTS) == {("shop-a",): 3, ("shop-b",): 3}
    assert deleted["events"] == sum(before.values()) - 6
    with registry.engine.connect() as conn:
        kept = sorted(conn.scalars(select(EVENTS.c.seq).where(EVENTS.c.shop_id == "shop-a", EVENTS.c.kind == "event")))
    assert kept == [4, 5, 6]


def test_count_bound_visits_a_chunk_per_run_and_cycles_through_new_nodes(registry, monkeypatch):
    """Each run trims the next third of the nodes in key order; after a cycle every node, new ones too, is at its bound."""
    monkeypatch.setattr(store_mod, "RETENTION_MIN_CHUNK", 1)
    monkeypatch.setattr(store_mod, "RETENTION_CYCLE_RUNS", 3)
    nodes = sorted(NODES12[:9])
    rs = RetentionSettings(heartbeats_per_node=2, heartbeat_max_age_s=LONG)
    write_rounds(registry, nodes, 5)
    for run in range(3):
        assert registry.enforce_retention(rs, T0 + 10)["heartbeats"] == 3 * 3
        c = counts(registry)
        assert [c[k] for k in nodes] == [2] * (3 * run + 3) + [5] * (6 - 3 * run)
    # Nodes added between runs, and more heartbeats of every node: one more cycle (11 nodes, chunks of 4) trims them all.
    added = [("shop-a", "pi-new"), ("shop-z", "pi-0")]
    write_rounds(registry, nodes[:8] + added, 3, start=5)
    for _ in range(3):
        registry.enforce_retention(rs, T0 + 20)
    assert counts(registry) == {k: 2 for k in nodes + added}
    assert seqs(registry, ("shop-z", "pi-0")) == [7, 8] and seqs(registry, nodes[8]) == [4, 5]


def test_age_bound_deletes_exactly_the_rows_received_before_it(registry):
    write_rounds(registry, NODES12[:3], 10)  # received at T0+1 .. T0+10
    deleted = registry.enforce_retention(RetentionSettings(heartbeats_per_node=100, heartbeat_max_age_s=4.5), T0 + 10)
    assert deleted["heartbeats"] == 3 * 5
    assert all(seqs(registry, k) == [6, 7, 8, 9, 10] for k in NODES12[:3])
    # Everything aged out: the table is emptied.
    assert registry.enforce_retention(RetentionSettings(heartbeats_per_node=100, heartbeat_max_age_s=1), T0 + 100)["heartbeats"] == 15
    assert counts(registry) == {}


def test_age_bound_after_a_clock_step_back_waits_for_the_younger_row_before_it(registry):
    """received_at only almost grows with id: a row stored after a younger one is deleted once that one ages out too (documented)."""
    key = ("shop-a", "pi-1")
    write_rounds(registry, [key], 3, at=T0)  # T0+1..T0+3
    write_rounds(registry, [key], 2, start=3, at=T0 - 100)  # clock stepped back: seq 4, 5 at T0-96, T0-95
    rs = RetentionSettings(heartbeats_per_node=100, heartbeat_max_age_s=10)
    assert registry.enforce_retention(rs, T0 + 12)["heartbeats"] == 1  # seq 1 (T0+1); seq 4, 5 wait behind seq 2
    assert seqs(registry, key) == [2, 3, 4, 5]
    assert registry.enforce_retention(rs, T0 + 20)["heartbeats"] == 4
    assert seqs(registry, key) == []


@pytest.mark.parametrize("keep", [1, 3])
def test_count_and_age_bounds_together_return_rows_deleted(registry, keep):
    write_rounds(registry, NODES12[:4], 6)  # T0+1..T0+6
    deleted = registry.enforce_retention(RetentionSettings(heartbeats_per_node=keep, heartbeat_max_age_s=3.5), T0 + 6)
    # Age deletes seq 1, 2 (received T0+1, T0+2 < T0+2.5); count keeps the newest `keep` of seq 3..6.
    assert deleted["heartbeats"] == 4 * (6 - keep)
    assert all(seqs(registry, k) == list(range(7 - keep, 7)) for k in NODES12[:4])

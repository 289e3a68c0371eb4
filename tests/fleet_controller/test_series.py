"""Time series on SQLite and PostgreSQL: samples from heartbeats and telemetry, rollup, retention, reads, API."""

from __future__ import annotations

import gc
import itertools
import json
import re
from pathlib import Path
from unittest.mock import patch

import pytest
import yaml
from alembic import command
from sqlalchemy import func, inspect, select
from sqlalchemy import text as sa_text

from edge_agent.protocol import NodeFacts, PipelineHealth, Reading, Telemetry
from fleet_controller.registry import series as series_module
from fleet_controller.registry.db import Base, create_engine
from fleet_controller.registry.migrations import alembic_config, upgrade
from fleet_controller.registry.series import (
    HOUR_FLUSH_SLACK_S,
    NODE_SERIES,
    RAW,
    ROLLUP,
    WRITERS,
    Rollups,
    SeriesRangeError,
    aged_buckets,
    choose_tier,
    points_from,
    read_series,
)
from fleet_controller.registry.store import (
    HEARTBEATS,
    PresenceView,
    RegistryStore,
    SeqCursor,
    WriteBatch,
    series_dead_after,
)
from fleet_controller.settings import (
    RetentionSettings,
    SeriesSettings,
    SettingsError,
    load_settings,
)
from tests.support.controller import heartbeat
from tests.support.metric_names import (
    defined_metrics,
    exposed_metrics,
    promtool_check_rules,
    used_metrics,
)

T0 = 1_800_000_000.0  # a multiple of 3600, so bucket boundaries are easy to reason about
FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.5, cpu_percent=25.0, mem_total_bytes=1000,
                  mem_available_bytes=250, disk_total_bytes=2000, disk_free_bytes=1500, cpu_temp_c=51.5)
CAM = {"cam-1": PipelineHealth(kind="vision", state="running", fps=9.5), "shelf": PipelineHealth(kind="hardware", state="running")}


def fridge(seq: int, ts: float, value: float, shop: str = "shop-a", source: str = "fridge-1") -> Telemetry:
    return Telemetry(shop=shop, node="pi-1", seq=seq, epoch="ep1", ts=ts,
                     readings=(Reading(name="temperature_c", value=value, unit="C", source=source),))


def write(registry, *msgs, at: float) -> None:
    wb = WriteBatch()
    for m in msgs:
        wb.uplinks.append((m, at))
        wb.seen[(m.shop, m.node)] = at
    registry.write_batch(wb, at)


def count(engine, table, **where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*(table.c[k] == v for k, v in where.items()))).scalar_one()


# ----- pure ---------------------------------------------------------------------------------------


def test_the_writers_buckets_are_not_objects_the_collector_tracks():
    """A writer holds a bucket per node, series and minute (and hour): at 100,000 nodes close to a million. Were each an
    object the collector tracks (an array per bucket, before 2026-12-01), every full collection would walk them all, a
    pause of half a second in the writer. Folding 20,000 buckets' samples adds a handful of tracked objects, not 20,000,
    and the buckets hold exactly what was folded."""
    rollups = Rollups()
    rows = [("shop-a", f"n-{i}", T0 + 10 * k, [("cpu_percent", "", float(i + k)), ("fps", "cam-1", 9.5)]) for i in range(10_000)
            for k in range(3)]
    gc.collect()
    before = len(gc.get_objects())
    rollups.add(rows)
    gc.collect()  # (the key tuples, of strings and floats, are untracked by the collection that first sees them)
    assert len(gc.get_objects()) - before < 500
    minutes = [r for part in rollups.minutes for r in part.rows(60)]
    assert len(minutes) == 20_000
    assert sorted(r for r in minutes if r[4] == "n-7") == [(60, "shop-a", "cpu_percent", T0, "n-7", "", 3, 24.0, 7.0, 9.0),
                                                          (60, "shop-a", "fps", T0, "n-7", "cam-1", 3, 28.5, 9.5, 9.5)]
    # The writer's other per-node state, a cursor and a presence per node, is not tracked either.
    assert not gc.is_tracked(SeqCursor("ep1", 7, ((2, 3),), ("ep0",), ("ep1", 9, 1))) and not gc.is_tracked(PresenceView(1, "online", "birth"))


def test_points_from_heartbeat_derive_node_series_and_camera_fps():
    hb = heartbeat(seq=1, ts=T0, facts=FACTS, pipelines=CAM)
    pts = {(p[0], p[1]): p[2] for p in points_from(hb)}
    assert pts == {("cpu_percent", ""): 25.0, ("cpu_load_1m", ""): 0.5, ("mem_used_percent", ""): 75.0,
                   ("disk_used_percent", ""): 25.0, ("cpu_temp_c", ""): 51.5, ("fps", "cam-1"): 9.5}


def test_points_skip_what_cannot_be_charted():
    """A pipeline without fps, a node without temperature and a NaN reading give no sample (not a zero)."""
    facts = FACTS.model_copy(update={"cpu_temp_c": None, "cpu_percent": None})
    names = {p[0] for p in points_from(heartbeat(seq=1, facts=facts, pipelines={"shelf": CAM["shelf"]}))}
    assert names == {"cpu_load_1m", "mem_used_percent", "disk_used_percent"}
    # The protocol refuses NaN on the wire; a value built around validation (an old stored row) is still skipped.
    nan = Reading.model_construct(name="x", value=float("nan"), unit="", source="", labels={})
    tel = Telemetry(shop="s", node="n", seq=1, epoch="e", readings=(Reading(name="y", value=2),)).model_copy(
        update={"readings": (nan, Reading(name="y", value=2))})
    assert points_from(tel) == [("y", "", 2.0)]


S = SeriesSettings()


@pytest.mark.parametrize(
    ("span", "step", "expected"),
    [
        (3600, None, ("raw", 0, 6.0)),  # 1 h: raw samples, 6 s buckets
        (86400, None, ("1m", 60, 180.0)),  # 24 h: minute buckets, 144 s rounded up to 3 min
        (7 * 86400, None, ("1m", 60, 1020.0)),  # 7 d: still minutes (hours would be coarser than wanted)
        (30 * 86400, None, ("1h", 3600, 7200.0)),  # beyond minutes' age: hours
        (3600, 300, ("1m", 60, 300.0)),  # a wide step reads the coarser tier
    ],
)
def test_choose_tier_from_range(span, step, expected):
    now = T0
    assert choose_tier(now - span + 1, now, now, S, step) == expected


def test_choose_tier_old_hour_reads_minutes_and_empty_range_is_refused():
    now = T0
    assert choose_tier(now - 7 * 86400 - 2, now, now, S)[0] == "1m"  # a browser's "7 d" a moment ago still reads minutes
    assert choose_tier(now - 8 * 86400, now, now, S)[0] == "1h"
    assert choose_tier(now - 3 * 86400, now - 3 * 86400 + 3600, now, S)[0] == "1m"  # raw no longer holds it
    with pytest.raises(SeriesRangeError, match="from < to"):
        choose_tier(now, now - 1, now, S)


def test_settings_refuse_tiers_out_of_order():
    with pytest.raises(SettingsError, match="raw_max_age_s <= minute_max_age_s"):
        load_settings(None, {"retention": {"series": {"raw_max_age_s": 900000}}}, environ={})
    s = load_settings(None, {}, environ={"SHOPFLEET_CONTROLLER_RETENTION__SERIES__MAX_POINTS": "300"})
    assert s.retention.series.max_points == 300


# ----- on both engines ------------------------------------------------------------------------------


def test_migration_matches_models(registry):
    insp = inspect(registry.engine)
    for table in ("series_raw", "series_rollup", "series_writers"):
        assert {c["name"] for c in insp.get_columns(table)} == {c.name for c in Base.metadata.tables[table].columns}, table


def test_batches_store_samples_and_reads_align_lines(registry):
    write(registry, heartbeat(seq=1, ts=T0 + 10, facts=FACTS, pipelines=CAM), fridge(2, T0 + 10, 4.0), at=T0 + 10)
    write(registry, fridge(3, T0 + 20, 6.0), fridge(4, T0 + 20, 3.0, source="fridge-2"), at=T0 + 20)
    # One row per telemetry message; a heartbeat's samples are in its own heartbeat row (0019_heartbeat_samples).
    assert count(registry.engine, RAW) == 3
    with registry.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(HEARTBEATS).where(HEARTBEATS.c.samples.is_not(None))) == 1
    data = read_series(registry.engine, "shop-a", "temperature_c", start=T0, end=T0 + 3600, now=T0 + 3600)
    assert data.resolution == "raw" and data.unit == "C" and data.step == 6.0
    assert data.times == [T0 + 6, T0 + 18]
    lines = {ln.source: ln.mean for ln in data.lines}
    assert lines == {"fridge-1": [4.0, 6.0], "fridge-2": [None, 3.0]}
    fps = read_series(registry.engine, "shop-a", "fps", start=T0, end=T0 + 3600, now=T0 + 3600, source="cam-1")
    assert [(ln.node, ln.source, ln.mean) for ln in fps.lines] == [("pi-1", "cam-1", [9.5])] and fps.unit == "fps"
    assert read_series(registry.engine, "shop-a", "fps", start=T0, end=T0 + 3600, now=T0 + 3600, node="pi-2").lines == []
    total = read_series(registry.engine, "shop-a", "temperature_c", start=T0, end=T0 + 3600, now=T0 + 3600, total=True)
    assert total.lines[-1].source == "total" and total.lines[-1].mean == [4.0, 9.0]


def test_raw_rows_keep_every_value_exactly(registry):
    """The batch's raw rows (one statement of a JSON array on PostgreSQL, executemany on SQLite; a heartbeat's in its own
    row) keep ids, the
    timestamp to the last bit and every sample value: awkward floats, tiny, huge, negative zero, odd ids."""
    values = [0.1 + 0.2, 1e-7, 1.7976931348623157e308, -0.0, 123456789.123456789, 5e-324]
    msgs = [Telemetry(shop="shop-x", node=f"n-{i}", seq=1, epoch="ep1", ts=T0 + 0.123456789 * (i + 1),
                      readings=(Reading(name="w.g:1", value=v, source=f"slot-{i}"),)) for i, v in enumerate(values)]
    write(registry, *msgs, heartbeat(shop="shop-x", node="pi-9", seq=1, ts=T0 + 1 / 3, facts=FACTS, pipelines=CAM), at=T0 + 2)
    with registry.engine.connect() as conn:
        rows = conn.execute(select(RAW.c.shop_id, RAW.c.node_id, RAW.c.ts, RAW.c.samples).order_by(RAW.c.id)).all()
        rows += conn.execute(select(HEARTBEATS.c.shop_id, HEARTBEATS.c.node_id, HEARTBEATS.c.ts, HEARTBEATS.c.samples)).all()
    assert [(r.shop_id, r.node_id, r.ts) for r in rows] == [("shop-x", m.node, m.ts) for m in msgs] + [("shop-x", "pi-9", T0 + 1 / 3)]
    assert [json.loads(r.samples) for r in rows[:-1]] == [[["w.g:1", f"slot-{i}", v]] for i, v in enumerate(values)]
    assert [tuple(p) for p in json.loads(rows[-1].samples)] == points_from(
        heartbeat(shop="shop-x", node="pi-9", seq=1, ts=T0 + 1 / 3, facts=FACTS, pipelines=CAM))


def rollup_rows(engine, step=None):
    with engine.connect() as conn:
        q = select(ROLLUP.c.step, ROLLUP.c.bucket, ROLLUP.c.n, ROLLUP.c.total, ROLLUP.c.lo, ROLLUP.c.hi).order_by(ROLLUP.c.step, ROLLUP.c.bucket)
        if step is not None:
            q = q.where(ROLLUP.c.step == step)
        return [tuple(r) for r in conn.execute(q)]


RETENTION = RetentionSettings(series=SeriesSettings(raw_max_age_s=3600, minute_max_age_s=86400, hour_max_age_s=7 * 86400))
EVERY_BATCH = RETENTION.model_copy(update={"interval_s": 1.0})
"""Retention whose flush parts are paced well under a second apart: the tests below that write a batch a second see one part per batch."""


def test_rollup_then_retention_keeps_every_sample_in_the_coarser_tiers(registry):
    """Samples are folded into minute buckets on every run and hour buckets once the hour is over, before raw ones
    age out; a late sample lands in its old bucket."""
    write(registry, *[fridge(i + 1, T0 + i * 20, float(i)) for i in range(6)], at=T0 + 120)  # 0..100 s: minutes 0 and 1
    deleted = registry.enforce_retention(RETENTION, T0 + 180)
    assert deleted["series_raw"] == 0 and count(registry.engine, RAW) == 6
    assert rollup_rows(registry.engine) == [(60, T0, 3, 3.0, 0.0, 2.0), (60, T0 + 60, 3, 12.0, 3.0, 5.0)]  # the hour is not over
    # A replayed, late sample of minute 0 arrives after the flush: the next run merges it into that bucket.
    write(registry, fridge(7, T0 + 30, -9.0), at=T0 + 200)
    registry.enforce_retention(RETENTION, T0 + 240)
    with registry.engine.connect() as conn:
        m0 = conn.execute(select(ROLLUP.c.n, ROLLUP.c.lo).where(ROLLUP.c.step == 60, ROLLUP.c.bucket == T0)).one()
    assert tuple(m0) == (4, -9.0) and rollup_rows(registry.engine, 3600) == []
    # Past the hour's end and its slack, the hour bucket is written once, with all seven samples; the raw rows,
    # past their age and now held by both tiers, go in the same run.
    deleted = registry.enforce_retention(RETENTION, T0 + 3600 + HOUR_FLUSH_SLACK_S)
    assert rollup_rows(registry.engine, 3600) == [(3600, T0, 7, 6.0, -9.0, 5.0)]
    assert deleted["series_raw"] == 7 and count(registry.engine, RAW) == 0
    # Two hours on, the minute buckets answer a 24 h chart with the same values.
    data = read_series(registry.engine, "shop-a", "temperature_c", start=T0 + 7200 - 86400, end=T0 + 7200,
                       settings=RETENTION.series, now=T0 + 7200)
    assert data.resolution == "1m" and len(data.lines) == 1
    assert data.lines[0].min == [-9.0] and data.lines[0].max == [5.0]  # both minutes fall in one 180 s bucket
    assert data.lines[0].mean == [pytest.approx(6.0 / 7, abs=1e-3)]
    # Past the minutes' age, the hour bucket still holds them; past the hours' age, nothing.
    deleted = registry.enforce_retention(RETENTION, T0 + 86400 + 120)
    assert deleted["series_rollup"] == 2 and count(registry.engine, ROLLUP, step=3600) == 1
    registry.enforce_retention(RETENTION, T0 + 7 * 86400 + 3601)
    assert count(registry.engine, ROLLUP) == 0


def truth(msgs, step):
    """The buckets a fold of every message gives: (step, bucket, n, total, lo, hi), per bucket (one node, one series)."""
    acc = {}
    for m in msgs:
        v = m.readings[0].value
        b = float(int(m.ts // step) * step)
        n, t, lo, hi = acc.get(b, (0, 0.0, v, v))
        acc[b] = (n + 1, t + v, min(lo, v), max(hi, v))
    return [(step, b, *acc[b]) for b in sorted(acc)]


def test_a_dead_writers_unflushed_samples_are_folded_by_another_exactly_once(db_url):
    """A writer killed with buckets in memory: its raw rows above its cursors are folded again by the next writer's run
    once it has not flushed for dead_after, in chunks, then it is forgotten; nothing is counted twice."""
    engine = create_engine(db_url)
    upgrade(engine)
    a, b = RegistryStore(engine), RegistryStore(engine)
    msgs = [fridge(i + 1, T0 + 7 * i, float(i % 13)) for i in range(400)]  # 0..2800 s: 47 minutes of one hour
    write(a, *msgs[:100], at=T0 + 700)
    a.enforce_retention(RETENTION, T0 + 700)  # a flushes minutes up to its row 100, not hours
    write(a, *msgs[100:250], at=T0 + 1750)  # ... and dies with these in memory
    write(b, *msgs[250:], at=T0 + 2800)  # the other writer (a replica, or the restarted controller's)
    dead_after = series_dead_after(RETENTION)
    b.enforce_retention(RETENTION, T0 + 700 + dead_after - 1)  # a is not dead yet: only b's own minutes
    assert rollup_rows(engine, 60) != truth(msgs, 60)
    with patch.object(series_module, "RECOVERY_CHUNK", 120):  # a's 250 rows for the hour tier: three runs
        for k in range(1, 4):
            b.enforce_retention(RETENTION, T0 + 700 + dead_after + k)
    assert rollup_rows(engine, 60) == truth(msgs, 60)
    with engine.connect() as conn:
        assert [w for (w,) in conn.execute(select(WRITERS.c.wid))] == [b.rollups.wid]  # a is forgotten
    b.enforce_retention(RETENTION, T0 + 4000 + dead_after)  # b's hour flush: the hour holds all 400, once
    assert rollup_rows(engine, 3600) == [(3600, T0, 400, *truth(msgs, 3600)[0][3:])]
    assert rollup_rows(engine, 60) == truth(msgs, 60)
    engine.dispose()


def test_a_writer_taken_for_dead_drops_its_buckets_instead_of_counting_twice(registry):
    """A writer that stalled past dead_after and was recovered by another must not flush what it held."""
    write(registry, *[fridge(i + 1, T0 + i, 1.0) for i in range(10)], at=T0 + 10)
    other = RegistryStore(registry.engine)
    other.enforce_retention(RETENTION, T0 + 10 + series_dead_after(RETENTION) + 1)  # takes `registry` for dead
    assert rollup_rows(registry.engine, 60) == [(60, T0, 10, 10.0, 1.0, 1.0)]
    registry.enforce_retention(RETENTION, T0 + 20 + series_dead_after(RETENTION))
    assert rollup_rows(registry.engine, 60) == [(60, T0, 10, 10.0, 1.0, 1.0)] and registry.rollups.lost_flushes == 1
    write(registry, fridge(11, T0 + 11, 2.0), at=T0 + 700)  # it registers again and goes on
    registry.enforce_retention(RETENTION, T0 + 30 + series_dead_after(RETENTION))
    assert rollup_rows(registry.engine, 60) == [(60, T0, 11, 12.0, 1.0, 2.0)]


def reading(node: str, seq: int, ts: float, value: float) -> Telemetry:
    return Telemetry(shop="shop-a", node=node, seq=seq, epoch="ep1", ts=ts, readings=(Reading(name="w", value=value, source="s"),))


def fold_truth(msgs, step, value=lambda m: m.readings[0].value):
    """The buckets a fold of every message's sample gives: (step, node, bucket, n, total, lo, hi)."""
    acc = {}
    for m in msgs:
        v, b = value(m), float(int(m.ts // step) * step)
        n, t, lo, hi = acc.get((m.node, b), (0, 0.0, v, v))
        acc[(m.node, b)] = (n + 1, t + v, min(lo, v), max(hi, v))
    return sorted((step, node, b, *acc[(node, b)]) for node, b in acc)


def node_rollups(engine, step, name=None):
    """The stored buckets of one tier (of one series ``name``, or all)."""
    q = select(ROLLUP.c.step, ROLLUP.c.node_id, ROLLUP.c.bucket, ROLLUP.c.n, ROLLUP.c.total, ROLLUP.c.lo, ROLLUP.c.hi).where(ROLLUP.c.step == step)
    if name is not None:
        q = q.where(ROLLUP.c.name == name)
    with engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(q))


FLEET = [reading(f"n-{i}", 1, T0 + i % 50, float(i % 7)) for i in range(40)] + \
        [reading(f"n-{i}", 2, T0 + 61 + i % 50, float(i % 5)) for i in range(40)]


def test_a_large_flush_goes_in_parts_with_the_batches_that_follow(registry):
    """Past PART_BUCKETS the retention run only takes the flush; each following batch writes one part in its own
    transaction, and a batch that rolls back has its part written again by the next one: exact, nothing twice."""
    with patch.object(series_module, "PART_BUCKETS", 10):
        write(registry, *FLEET, at=T0 + 120)
        registry.enforce_retention(EVERY_BATCH, T0 + 180)
        assert len(registry.rollups.flush.parts) == series_module.PARTS and node_rollups(registry.engine, 60) == []
        write(registry, reading("late", 1, T0 + 500, 1.0), at=T0 + 190)  # one part per batch
        first, done = node_rollups(registry.engine, 60), registry.rollups.flush.done
        assert 0 < len(first) < 80
        real_step = registry.rollups.step

        def failing_step(conn, parts=1, now=None):
            real_step(conn, parts, now)
            raise RuntimeError("the database went away")

        with patch.object(registry.rollups, "step", failing_step), pytest.raises(RuntimeError):
            write(registry, reading("late", 2, T0 + 501, 1.0), at=T0 + 191)
        assert node_rollups(registry.engine, 60) == first and registry.rollups.flush.done == done
        batches = 0
        while registry.rollups.flush is not None and batches < series_module.PARTS:
            write(registry, reading("late", 3 + batches, T0 + 502 + batches, 1.0), at=T0 + 192 + batches)
            batches += 1
            assert registry.rollups.flush is None or len(node_rollups(registry.engine, 60)) < 80
        assert registry.rollups.flush is None and batches > 5
        assert node_rollups(registry.engine, 60) == fold_truth(FLEET, 60)
        stored = [*FLEET, reading("late", 1, T0 + 500, 1.0), *(reading("late", 3 + k, T0 + 502 + k, 1.0) for k in range(batches))]
        # The hours, once due, come in parts too: the hour maps (the minutes of the parts written before) plus the
        # minutes taken now, each part's hours written once; a part that rolls back is written again, not twice.
        again = [reading(f"n-{i}", 3, T0 + 3000 + i, 2.0) for i in range(40)]  # minutes in every part this time
        write(registry, *again, at=T0 + 3100)
        stored += again
        registry.enforce_retention(EVERY_BATCH, T0 + 3600 + HOUR_FLUSH_SLACK_S)
        assert registry.rollups.flush is not None and registry.rollups.flush.hours and node_rollups(registry.engine, 3600) == []
        with patch.object(registry.rollups, "step", failing_step), pytest.raises(RuntimeError):
            write(registry, reading("later", 1, T0 + 3700, 5.0), at=T0 + 3730)
        k = 0
        while registry.rollups.flush is not None and k < series_module.PARTS:
            write(registry, reading("later", 2 + k, T0 + 3701 + k, 5.0), at=T0 + 3731 + k)
            stored.append(reading("later", 2 + k, T0 + 3701 + k, 5.0))
            k += 1
        assert registry.rollups.flush is None
        hours = node_rollups(registry.engine, 3600)
        assert hours == fold_truth([m for m in stored if m.ts < T0 + 3600], 3600)
        # The later samples (the next hour) wait in the hour maps for that hour to end.
        registry.enforce_retention(EVERY_BATCH, T0 + 7200 + HOUR_FLUSH_SLACK_S)
        k = 0
        while registry.rollups.flush is not None and k < series_module.PARTS:
            write(registry, reading("last", 1 + k, T0 + 7300 + k, 1.0), at=T0 + 7330 + k)
            k += 1
        assert node_rollups(registry.engine, 3600) == fold_truth([m for m in stored if m.ts < T0 + 7200], 3600)


def test_a_flush_in_parts_is_spread_over_half_the_retention_interval(registry):
    """The batches that follow a retention run write its parts at most one per ``interval_s x FLUSH_SPREAD / parts``
    seconds, not one per batch: a stream of batches ten times a second writes the flush over 30 s of a 60-s interval."""
    assert RETENTION.interval_s == 60.0
    with patch.object(series_module, "PART_BUCKETS", 10):
        write(registry, *FLEET, at=T0 + 120)
        registry.enforce_retention(RETENTION, T0 + 180)
        flush = registry.rollups.flush
        filled = sum(1 for m, h in flush.parts if m or h)
        assert filled > 10 and flush.pace_s == pytest.approx(60.0 * series_module.FLUSH_SPREAD / filled)
        written_at: list[float] = []  # when each batch that wrote a part ran
        k = 0
        while registry.rollups.flush is not None and k < 1000:
            at = T0 + 180 + 0.1 * k
            before = registry.rollups.flush.done
            write(registry, reading("late", 1 + k, T0 + 200, 1.0), at=at)
            if registry.rollups.flush is None or registry.rollups.flush.done > before:
                written_at.append(at)
            k += 1
        assert registry.rollups.flush is None, "the flush never finished"
        assert len(written_at) == filled  # one part per writing batch; the other batches wrote none
        gaps = [b - a for a, b in itertools.pairwise(written_at)]
        assert min(gaps) >= flush.pace_s - 1e-6
        assert written_at[-1] - written_at[0] == pytest.approx(flush.pace_s * (filled - 1), abs=0.1 * filled)
        assert written_at[-1] - T0 - 180 <= 60.0 * series_module.FLUSH_SPREAD + 0.1 * filled  # each gap rounded up to a batch
        # Paced or not, the minute tier holds every sample once.
        stored = [*FLEET, *(reading("late", 1 + i, T0 + 200, 1.0) for i in range(k))]
        registry.enforce_retention(EVERY_BATCH, T0 + 400)
        while registry.rollups.flush is not None:
            k += 1
            write(registry, reading("late", 1 + k, T0 + 200, 1.0), at=T0 + 400 + k)
            stored.append(reading("late", 1 + k, T0 + 200, 1.0))
        assert node_rollups(registry.engine, 60) == fold_truth(stored, 60)


@pytest.mark.parametrize("kind", ["telemetry", "heartbeats"])
def test_a_writer_dead_in_the_middle_of_a_flush_is_recovered_exactly(registry, kind):
    """The parts it wrote are skipped, the rest of its rows folded: the tiers hold every sample once.

    For telemetry (rows of ``series_raw``) and for heartbeats (samples in the heartbeat rows), each
    with its own cursors.
    """
    make, rollups, truth = (reading, node_rollups, fold_truth) if kind == "telemetry" else (cpu_hb, cpu_rollups, cpu_truth)
    fleet = [make(f"n-{i}", 1, T0 + i % 50, float(i % 7)) for i in range(40)] + \
            [make(f"n-{i}", 2, T0 + 61 + i % 50, float(i % 5)) for i in range(40)]
    with patch.object(series_module, "PART_BUCKETS", 10):
        write(registry, *fleet[:40], at=T0 + 50)
        registry.enforce_retention(EVERY_BATCH, T0 + 60)  # a flush in parts taken...
        write(registry, *fleet[40:], at=T0 + 120)  # ... one written with these, which stay in memory
        write(registry, make("n-0", 3, T0 + 130, 3.0), at=T0 + 130)  # a second part; then the writer dies
    assert 0 < registry.rollups.flush.done < series_module.PARTS
    other = RegistryStore(registry.engine)
    other.enforce_retention(RETENTION, T0 + 130 + series_dead_after(RETENTION) + 1)
    everything = [*fleet, make("n-0", 3, T0 + 130, 3.0)]
    assert rollups(registry.engine, 60) == truth(everything, 60)
    other.enforce_retention(RETENTION, T0 + 3600 + HOUR_FLUSH_SLACK_S + series_dead_after(RETENTION))
    assert rollups(registry.engine, 3600) == truth(everything, 3600)


# ----- heartbeat samples in the heartbeat rows (0019_heartbeat_samples) ------------------------------


def cpu_hb(node: str, seq: int, ts: float, value: float):
    return heartbeat(node=node, seq=seq, ts=ts, facts=FACTS.model_copy(update={"cpu_percent": value}), pipelines=CAM)


def cpu_truth(msgs, step):
    """The cpu_percent buckets a fold of every heartbeat gives."""
    return fold_truth(msgs, step, lambda m: m.facts.cpu_percent)


def cpu_rollups(engine, step):
    return node_rollups(engine, step, "cpu_percent")


def hb_count(engine) -> int:
    return count(engine, HEARTBEATS)


def test_a_dead_writers_heartbeat_samples_are_folded_by_another_exactly_once(db_url):
    """Heartbeat samples live in the heartbeat rows: a dead writer's rows above its cursors in that table are folded again,
    in chunks, with its telemetry rows in series_raw; nothing is counted twice."""
    engine = create_engine(db_url)
    upgrade(engine)
    a, b = RegistryStore(engine), RegistryStore(engine)
    hbs = [cpu_hb(f"pi-{i % 3}", i // 3 + 1, T0 + 7 * i, float(i % 11)) for i in range(300)]
    tel = [fridge(1000 + i, T0 + 7 * i + 1, float(i % 13)) for i in range(300)]
    write(a, *hbs[:100], *tel[:100], at=T0 + 700)
    a.enforce_retention(RETENTION, T0 + 700)  # a flushes its minutes, not its hours
    write(a, *hbs[100:200], *tel[100:200], at=T0 + 1400)  # ... and dies with these in memory
    write(b, *hbs[200:], *tel[200:], at=T0 + 2100)
    dead_after = series_dead_after(RETENTION)
    with patch.object(series_module, "RECOVERY_CHUNK", 60):  # a's 200 rows of each table for the hour tier: four runs
        for k in range(1, 5):
            b.enforce_retention(RETENTION, T0 + 700 + dead_after + k)
            with engine.connect() as conn:
                left = [w for (w,) in conn.execute(select(WRITERS.c.wid))]
            assert (a.rollups.wid in left) == (k < 4), k
    assert cpu_rollups(engine, 60) == cpu_truth(hbs, 60)
    assert rollup_rows(engine, 60) != [] and node_rollups(engine, 60)  # telemetry too
    with engine.connect() as conn:
        temps = sorted(tuple(r) for r in conn.execute(select(ROLLUP.c.step, ROLLUP.c.bucket, ROLLUP.c.n, ROLLUP.c.total, ROLLUP.c.lo,
                                                             ROLLUP.c.hi).where(ROLLUP.c.step == 60, ROLLUP.c.name == "temperature_c")))
    assert temps == truth(tel, 60)
    b.enforce_retention(RETENTION, T0 + 4000 + dead_after)  # b's hour flush: the hour holds all 300 heartbeats, once
    assert cpu_rollups(engine, 3600) == cpu_truth(hbs, 3600)
    engine.dispose()


def test_a_writer_taken_for_dead_drops_its_heartbeat_buckets_instead_of_counting_twice(registry):
    hbs = [cpu_hb("pi-1", i + 1, T0 + i, 1.0) for i in range(10)]
    write(registry, *hbs, at=T0 + 10)
    other = RegistryStore(registry.engine)
    other.enforce_retention(RETENTION, T0 + 10 + series_dead_after(RETENTION) + 1)  # takes `registry` for dead
    assert cpu_rollups(registry.engine, 60) == [(60, "pi-1", T0, 10, 10.0, 1.0, 1.0)]
    registry.enforce_retention(RETENTION, T0 + 20 + series_dead_after(RETENTION))
    assert cpu_rollups(registry.engine, 60) == [(60, "pi-1", T0, 10, 10.0, 1.0, 1.0)] and registry.rollups.lost_flushes == 1
    write(registry, cpu_hb("pi-1", 11, T0 + 11, 2.0), at=T0 + 700)  # it registers again and goes on
    registry.enforce_retention(RETENTION, T0 + 30 + series_dead_after(RETENTION))
    assert cpu_rollups(registry.engine, 60) == [(60, "pi-1", T0, 11, 12.0, 1.0, 2.0)]


def test_a_writer_given_a_forgotten_writers_id_never_folds_its_rows_again(registry):
    """SQLite gives the id of a forgotten (recovered) writer to the next one: its rows, already in the tiers, are below
    the new writer's cursors, so they are neither folded again should it die nor held back from the bounds."""
    hbs = [cpu_hb("pi-1", i + 1, T0 + i, 1.0) for i in range(5)]
    write(registry, *hbs, at=T0 + 5)
    dead_after = series_dead_after(RETENTION)
    RegistryStore(registry.engine).enforce_retention(RETENTION, T0 + 5 + dead_after + 1)  # folded, forgotten
    again = RegistryStore(registry.engine)
    write(again, cpu_hb("pi-1", 6, T0 + 6, 2.0), at=T0 + 6 + dead_after)  # registers (the same id on SQLite), then dies
    RegistryStore(registry.engine).enforce_retention(RETENTION, T0 + 7 + 2 * dead_after + 1)
    assert cpu_rollups(registry.engine, 60) == [(60, "pi-1", T0, 6, 7.0, 1.0, 2.0)]


def test_the_heartbeat_bounds_flush_the_hours_first_so_a_writer_dying_after_a_trim_loses_nothing(registry):
    """The count bound reaches heartbeats whose samples the hour tier does not hold yet: the run flushes the hours
    first (the bound stays exact), so the rows it deletes are in both tiers and recovery needs none of them."""
    rs = RetentionSettings(heartbeats_per_node=3, series=RETENTION.series)
    hbs = [cpu_hb("pi-1", i + 1, T0 + 10 * i, float(i)) for i in range(10)]
    write(registry, *hbs[:5], at=T0 + 50)
    assert registry.enforce_retention(rs, T0 + 60)["heartbeats"] == 2 and hb_count(registry.engine) == 3
    assert cpu_rollups(registry.engine, 3600) == cpu_truth(hbs[:5], 3600)  # before the hour is over
    write(registry, *hbs[5:], at=T0 + 100)  # then the writer dies with these in memory
    other = RegistryStore(registry.engine)
    assert other.enforce_retention(rs, T0 + 100 + series_dead_after(RETENTION) + 1)["heartbeats"] == 5
    assert hb_count(registry.engine) == 3
    assert cpu_rollups(registry.engine, 60) == cpu_truth(hbs, 60)
    assert cpu_rollups(registry.engine, 3600) == cpu_truth(hbs, 3600)


def test_a_dead_writers_heartbeats_wait_for_its_recovery_before_the_bounds_delete_them(registry):
    rs = RetentionSettings(heartbeats_per_node=2, series=RETENTION.series)
    hbs = [cpu_hb("pi-1", i + 1, T0 + 10 * i, float(i)) for i in range(6)]
    write(registry, *hbs, at=T0 + 60)  # the writer dies before any run
    other = RegistryStore(registry.engine)
    write(other, cpu_hb("pi-2", 1, T0 + 61, 1.0), at=T0 + 61)
    assert other.enforce_retention(rs, T0 + 70)["heartbeats"] == 0 and hb_count(registry.engine) == 7  # not dead yet: held
    assert other.enforce_retention(rs, T0 + 60 + series_dead_after(RETENTION) + 1)["heartbeats"] == 4  # folded, then trimmed
    assert hb_count(registry.engine) == 3
    assert cpu_rollups(registry.engine, 60) == cpu_truth([*hbs, cpu_hb("pi-2", 1, T0 + 61, 1.0)], 60)


def test_node_series_read_the_heartbeat_rows_then_the_minute_tier_past_the_history(registry):
    """The raw tier of a node series is its heartbeats: a range the trimmed history still holds reads them, one that
    starts before it reads the minute tier (the same samples, per minute), on both engines."""
    hbs = [cpu_hb("pi-1", i + 1, T0 + 10 * i, float(i % 5)) for i in range(60)]  # ten minutes
    for k in range(0, 60, 6):
        write(registry, *hbs[k:k + 6], at=T0 + 10 * k + 55)
    data = read_series(registry.engine, "shop-a", "cpu_percent", start=T0, end=T0 + 600, now=T0 + 600, settings=RETENTION.series)
    assert data.resolution == "raw" and data.times == [T0 + 10 * i for i in range(60)]
    assert data.lines[0].mean == [float(i % 5) for i in range(60)]
    registry.enforce_retention(RetentionSettings(heartbeats_per_node=30, series=RETENTION.series), T0 + 600)
    assert hb_count(registry.engine) == 30  # T0+300 .. T0+590 left
    data = read_series(registry.engine, "shop-a", "cpu_percent", start=T0, end=T0 + 600, now=T0 + 600, settings=RETENTION.series)
    assert data.resolution == "1m" and data.times == [T0 + 60 * i for i in range(10)]
    minutes = [[float((6 * k + j) % 5) for j in range(6)] for k in range(10)]
    assert data.lines[0].mean == [round(sum(m) / 6, 4) for m in minutes] and data.lines[0].max == [max(m) for m in minutes]
    late = read_series(registry.engine, "shop-a", "cpu_percent", start=T0 + 300, end=T0 + 600, now=T0 + 600, settings=RETENTION.series)
    assert late.resolution == "raw" and late.lines[0].mean == [float(i % 5) for i in range(30, 60)]
    # Another shop's, another node's series: nothing to hold, raw (empty); telemetry keeps its raw tier of raw_max_age_s.
    assert read_series(registry.engine, "shop-a", "cpu_percent", start=T0, end=T0 + 600, now=T0 + 600, node="pi-9",
                       settings=RETENTION.series).resolution == "raw"


def test_upgrade_to_0019_keeps_the_heartbeat_samples_stored_before(db_url):
    """A database with data crosses 0019 both ways: downgraded, the heartbeats' samples go back to series_raw; upgraded
    again, reads give the same answers (from series_raw and the new heartbeat rows), and nothing is folded twice."""
    engine = create_engine(db_url)
    upgrade(engine)
    registry = RegistryStore(engine)
    hbs = [cpu_hb("pi-1", i + 1, T0 + 10 * i, float(i % 7)) for i in range(30)]
    write(registry, *hbs[:20], fridge(100, T0 + 5, 4.0), at=T0 + 200)
    registry.enforce_retention(RETENTION, T0 + 200)

    def read(name):
        d = read_series(engine, "shop-a", name, start=T0, end=T0 + 3600, now=T0 + 3600, settings=RETENTION.series)
        return d.resolution, d.times, [(ln.node, ln.source, ln.mean) for ln in d.lines]

    before = read("cpu_percent"), read("temperature_c"), cpu_rollups(engine, 60)
    assert before[0][0] == "raw" and len(before[0][1]) == 20
    engine.dispose()
    command.downgrade(alembic_config(engine), "0018_series_writers")
    with engine.connect() as conn:
        assert "samples" not in {c["name"] for c in inspect(conn).get_columns("heartbeats")}
        assert conn.scalar(select(func.count()).select_from(RAW)) == 21  # the heartbeats' samples and the fridge's
    upgrade(engine)
    assert (read("cpu_percent"), read("temperature_c"), cpu_rollups(engine, 60)) == before
    again = RegistryStore(engine)
    write(again, *hbs[20:], at=T0 + 300)
    again.enforce_retention(RETENTION, T0 + 300)
    resolution, times, lines = read("cpu_percent")
    assert resolution == "raw" and len(times) == 30 and lines[0][2] == [float(i % 7) for i in range(30)]
    assert cpu_rollups(engine, 60) == cpu_truth(hbs, 60)
    engine.dispose()


def test_raw_rows_stay_until_every_writer_holds_them_and_a_far_future_row_holds_nothing_back(registry):
    write(registry, *[fridge(i + 1, T0 + i, 1.0) for i in range(5)], at=T0 + 5)
    write(registry, fridge(6, T0 + 10 * 86400, 9.0), at=T0 + 6)  # a node whose clock is ten days ahead
    write(registry, *[fridge(i + 7, T0 + 10 + i, 1.0) for i in range(5)], at=T0 + 16)
    # Past the raw age but before the hour flush: the hour tier does not hold them yet, so they stay.
    assert registry.enforce_retention(RETENTION, T0 + 3600 + 60)["series_raw"] == 0
    # After it they go, the future row with them (its samples are in the tiers; it would block every later row).
    assert registry.enforce_retention(RETENTION, T0 + 3600 + HOUR_FLUSH_SLACK_S)["series_raw"] == 11
    assert count(registry.engine, RAW) == 0


def test_aging_buckets_out_reads_a_range_of_the_age_index_not_the_whole_tier(registry):
    stmt = aged_buckets(60, T0)
    with registry.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = " ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert "ix_series_rollup_age" in plan and "SCAN" not in plan, plan
        else:  # an empty table: make the planner consider the index as it would on a large one
            conn.exec_driver_sql("SET enable_seqscan = off")
            sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
            plan = " ".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}"))
            assert "ix_series_rollup_age" in plan, plan


def test_the_old_single_cursor_becomes_writer_zero(db_url):
    """Rows stored before 0018: those past the old cursor are folded by the first run, those before it are not folded again."""
    engine = create_engine(db_url)
    upgrade(engine, "0007_series")
    with engine.begin() as conn:
        for i in range(6):
            conn.execute(sa_text("INSERT INTO series_raw (shop_id, node_id, ts, samples) VALUES ('shop-a', 'pi-1', :ts, :s)"),
                         {"ts": T0 + 10 * i, "s": json.dumps([["temperature_c", "fridge-1", float(i)]])})
        conn.execute(sa_text("INSERT INTO series_cursors (step, last_id) VALUES (0, (SELECT min(id) + 2 FROM series_raw))"))
    upgrade(engine)
    registry = RegistryStore(engine)
    registry.enforce_retention(RETENTION, T0 + 60)
    assert rollup_rows(engine) == [(60, T0, 3, 12.0, 3.0, 5.0), (3600, T0, 3, 12.0, 3.0, 5.0)]  # rows 4..6 only
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(WRITERS)) == 0
    engine.dispose()


def test_reads_stay_within_max_points(registry):
    write(registry, *[fridge(i + 1, T0 + i, float(i % 7)) for i in range(400)], at=T0 + 400)
    data = read_series(registry.engine, "shop-a", "temperature_c", start=T0, end=T0 + 400,
                       settings=SeriesSettings(max_points=50), now=T0 + 400)
    assert len(data.times) <= 51 and data.step == 8.0
    assert max(v for v in data.lines[0].max if v is not None) == 6.0


# ----- API ---------------------------------------------------------------------------------------


def test_series_api(api_client, registry):
    import time

    now = time.time()
    write(registry, fridge(1, now - 30, 4.5), fridge(2, now - 20, 5.5), at=now)
    r = api_client.get("/api/v1/shops/shop-a/series", params={"name": "temperature_c", "from": now - 3600, "to": now})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resolution"] == "raw" and body["lines"][0]["source"] == "fridge-1"
    assert [v for v in body["lines"][0]["mean"] if v is not None] == [4.5, 5.5]
    assert api_client.get("/api/v1/shops/shop-a/series", params={"name": "temperature_c"}).json()["lines"]  # default: last hour
    r = api_client.get("/api/v1/shops/nowhere/series", params={"name": "fps"})
    assert r.status_code == 404 and "GET /api/v1/shops" in r.json()["detail"]
    r = api_client.get("/api/v1/shops/shop-a/series", params={"name": "fps", "from": now, "to": now - 10})
    assert r.status_code == 422 and "from < to" in r.json()["detail"]
    assert api_client.get("/api/v1/shops/shop-a/series", params={"name": "bad name/"}).status_code == 422


def test_vendored_uplot_is_served_without_login(api_client):
    api_client.headers.pop("Authorization")
    r = api_client.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert r.status_code == 200 and "uPlot" in r.text[:2000]
    assert api_client.get("/static/vendor/uplot/LICENSE").text.startswith("The MIT License")
    assert api_client.get("/static/vendor/uplot/..%2Fseries_api.py").status_code == 404
    assert api_client.get("/api/v1/shops/shop-a/series", params={"name": "fps"}).status_code == 401


# ----- Grafana dashboard and Prometheus recording rules ----------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "prometheus" / "recording-rules.yaml"
GRAFANA = ROOT / "docs" / "grafana" / "shopfleet.json"


def rule_exprs() -> tuple[set[str], list[str]]:
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    return {r["record"] for r in rules}, [r["expr"] for r in rules]


def grafana_targets() -> list[dict]:
    doc = json.loads(GRAFANA.read_text())
    return [t for p in doc["panels"] for t in p.get("targets", [])]


def test_every_metric_the_rules_and_dashboard_use_is_exported():
    assert {"shopfleet_controller_ingested", "shopfleet_vision_fps", "shopfleet_controller_nodes"} <= defined_metrics()
    exposed = exposed_metrics()
    assert {"shopfleet_vision_fps", "shopfleet_controller_ingested_total", "shopfleet_nope_total"} - exposed == {"shopfleet_nope_total"}
    recorded, exprs = rule_exprs()
    prom = [t["expr"] for t in grafana_targets() if "expr" in t]
    used = used_metrics(exprs + prom)
    assert len(used) >= 15 and used - exposed == set()
    # The dashboard's recording-rule series (level:metric:operation) are all recorded by the rules file.
    used_rules = {m for e in prom for m in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", e)}
    assert used_rules and used_rules <= recorded, used_rules - recorded


def test_dashboard_sql_panels_read_existing_series_columns():
    from fleet_controller.registry import series  # noqa: F401  (declares the series tables on Base)

    sqls = [t["rawSql"] for t in grafana_targets() if "rawSql" in t]
    assert len(sqls) >= 5
    cols = {c.name for c in Base.metadata.tables["series_rollup"].columns}
    for q in sqls:
        assert set(re.findall(r"\bFROM (\w+)", q)) == {"series_rollup"}, q
        assert {"bucket", "total", "n", "step", "shop_id", "name"} <= cols
        names = re.findall(r"name = '(\w+)'", q)
        assert names and all(n in NODE_SERIES or n in ("temperature_c", "shelf_weight_g") for n in names), q


def test_recording_rules_pass_promtool():
    promtool_check_rules(RULES)

"""The registry writer alone at fleet scale: CPU, garbage collector, syscalls and disk per message.

What bench/scale.py's writer does at 100,000 nodes, without MQTT, in this process: one heartbeat
period of the whole fleet per round through :meth:`IntakeCore.process_batch` (batches of ``--batch``, 500) and
the presence sweep every ``--sweep-every`` batches of 500 (about once a second at 10,000 msg/s), on a
simulated clock. Unlike bench/writer.py the nodes arrive in bench/scale.py's order (each node in
its own slot of the period, a prime stride over the fleet), so a batch's 500 nodes are scattered
over the ``nodes`` table and its indexes as in a real fleet, not neighbours sharing pages.

The first run builds a database of ``--nodes`` nodes seen once (kept in ``--base``, reused); each
run works on a copy. Round 0 loads every node's cursor and presence into the writer (the
writer's first minute); rounds 1.. are the steady state. Per round: CPU and wall microseconds per
message, the share of the garbage collector (``gc.callbacks``, per generation), the sweep's
milliseconds, and read/write system calls and bytes per message (``/proc/self/io``).

``--pragmas`` runs extra SQLite pragmas on each connection (``cache_size=-2000,wal_autocheckpoint=1000``:
SQLite's defaults, the registry's before 2026-11-30); ``--gc-threshold 20000,50,50`` sets the
collector's thresholds after the start-up ``gc.freeze()`` the writer process does (by default the writer process's
own, ``WRITER_GC_THRESHOLDS``; before 2026-12-01 this benchmark left Python's 700,10,10).

``--retention`` measures retention instead (issue #15): the first-sight database grown to
``--heartbeats`` heartbeats per node (copied in SQL, ids in arrival order), then, interleaved
``--trials`` times on fresh copies, the full-table ``row_number()`` retention of before
2026-11-30 (two runs: the first deletes the excess, the second is the steady state) and the
incremental one (two cycles of ``RETENTION_CYCLE_RUNS`` runs: the first deletes the excess, the second nothing), with ``--keep`` heartbeats per node.

``--with-retention`` also runs the writer's retention (and so starts a series flush, written in
parts by the next batches) after each round and prints its milliseconds; the SQLite checkpointer
thread runs as in the writer process unless ``--no-checkpointer``. With ``--history N`` every node starts
with N heartbeats and retention keeps N, so its count bound deletes what the rounds add (a deployed
fleet's steady state; without it every node holds one heartbeat and nothing is trimmed). Each round also prints the
batches' p50/p99/max milliseconds, the WAL's size and the checkpoints the thread made.

    .venv/bin/python bench/scale_writer.py [--nodes 100000] [--rounds 3] [--pragmas P,...] [--gc-threshold A,B,C] [--with-retention [--history N]]
        [--no-checkpointer] [--page-size N] [--profile FILE]
    .venv/bin/python bench/scale_writer.py --storm 0,5000 [--nodes 100000]
    .venv/bin/python bench/scale_writer.py --retention [--nodes 100000] [--heartbeats 20] [--keep 18] [--trials 2]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import writer as single  # bench/writer.py: the same heartbeats
from sqlalchemy import delete, event, func, select
from sqlalchemy.engine import Engine

from fleet_controller.intake.core import WRITER_GC_THRESHOLDS, IntakeCore
from fleet_controller.registry import db as registry_db
from fleet_controller.registry import series
from fleet_controller.registry import store as registry_store
from fleet_controller.registry.db import create_engine, start_checkpointer
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import (
    EVENTS,
    HEARTBEATS,
    QUARANTINE,
    QUARANTINE_KEEP,
    RegistryStore,
)
from fleet_controller.settings import PresenceSettings, RetentionSettings

SLOTS = 200  # bench/scale.py's slots of a heartbeat period


def scattered(nodes: int, seq: int) -> list[tuple[str, bytes, int]]:
    """Heartbeat ``seq`` of every node in bench/scale.py's sending order (slot by slot)."""
    msgs = single.stream(nodes, seq)
    return [msgs[i] for i in sorted(range(nodes), key=lambda i: ((i * 7919) % SLOTS, i))]


def engine_for(path: Path, pragmas: list[str]) -> Engine:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _extra(dbapi_conn: Any, _record: Any) -> None:  # after the registry's own pragmas
        cur = dbapi_conn.cursor()
        for p in pragmas:
            cur.execute(f"PRAGMA {p}")
        cur.close()

    return engine


def work_copy(src: Path) -> Path:
    """Return a scratch copy of the database ``src`` for one run (remove it with :func:`remove_db`)."""
    work = src.with_name(f"work-{os.getpid()}.db")
    shutil.copy(src, work)
    return work


def remove_db(path: Path) -> None:
    """Remove a SQLite database and its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def io_counters() -> dict[str, int]:
    text = Path(f"/proc/{os.getpid()}/io").read_text()
    return {k: int(v) for k, v in (line.split(":") for line in text.splitlines())}


def old_retention(store: RegistryStore, settings: RetentionSettings, now: float) -> dict[str, int]:
    """RegistryStore.enforce_retention as it was before 2026-11-30: row_number() over the whole tables."""
    deleted: dict[str, int] = {}
    with store.engine.begin() as conn:
        for table, part, keep, max_age in (
            (HEARTBEATS, (HEARTBEATS.c.shop_id, HEARTBEATS.c.node_id), settings.heartbeats_per_node, settings.heartbeat_max_age_s),
            (EVENTS, (EVENTS.c.shop_id,), settings.events_per_shop, settings.event_max_age_s),
        ):
            n = conn.execute(delete(table).where(table.c.received_at < now - max_age)).rowcount
            ranked = select(table.c.id, func.row_number().over(partition_by=part, order_by=table.c.id.desc()).label("rn")).subquery()
            n += conn.execute(delete(table).where(table.c.id.in_(select(ranked.c.id).where(ranked.c.rn > keep)))).rowcount
            deleted[table.name] = n
        deleted.update(store.rollups.maintain(conn, settings.series, now, registry_store.series_dead_after(settings)))
        newest_kept = select(QUARANTINE.c.id).order_by(QUARANTINE.c.id.desc()).offset(QUARANTINE_KEEP).limit(1).scalar_subquery()
        deleted["quarantine"] = conn.execute(delete(QUARANTINE).where(QUARANTINE.c.id <= newest_kept)).rowcount
    return deleted


def grow_history(base: Path, heartbeats: int) -> Path:
    """Return a copy of ``base`` where every node has ``heartbeats`` heartbeats, 10 s apart, ids in arrival order (kept, reused)."""
    grown = base.with_name(f"{base.stem}-hb{heartbeats}.db")
    if grown.exists():
        return grown
    tmp = grown.with_suffix(".tmp")
    shutil.copy(base, tmp)
    engine = engine_for(tmp, [])
    cols = [c.name for c in HEARTBEATS.columns if c.name != "id"]
    shifted = ", ".join({"seq": "seq + :r", "ts": "ts + :r * 10", "received_at": "received_at + :r * 10"}.get(c, c) for c in cols)
    with engine.begin() as conn:
        first = conn.scalar(select(func.max(HEARTBEATS.c.id)))
        for r in range(1, heartbeats):
            conn.exec_driver_sql(f"INSERT INTO heartbeats ({', '.join(cols)}) SELECT {shifted} FROM heartbeats WHERE id <= :first "
                                 "ORDER BY id", {"r": r, "first": first})
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    tmp.rename(grown)
    return grown


def retention_bench(base: Path, args: argparse.Namespace) -> None:
    """Old and new retention, interleaved on fresh copies of the grown database: seconds per run, rows deleted."""
    grown = grow_history(base, args.heartbeats)
    settings = RetentionSettings(heartbeats_per_node=args.keep)
    engine = engine_for(grown, [])
    with engine.begin() as conn:
        now = (conn.scalar(select(func.max(HEARTBEATS.c.received_at))) or 0.0) + 5
        # The first sight's samples rolled up once here, so neither form's first run pays for it.
        rollups = series.Rollups()
        while rollups.recover(conn, now, 0.0):
            pass
    engine.dispose()
    runs = {"old": 2, "new": 2 * registry_store.RETENTION_CYCLE_RUNS}  # new: a cycle that deletes, one that finds nothing
    for trial in range(args.trials):
        for form in ("old", "new"):
            work = work_copy(grown)
            store = RegistryStore(engine_for(work, []))
            try:
                for run in range(runs[form]):
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    deleted = old_retention(store, settings, now) if form == "old" else store.enforce_retention(settings, now)
                    print(json.dumps({
                        "trial": trial, "form": form, "run": run, "nodes": args.nodes, "heartbeats_per_node": args.heartbeats,
                        "keep": args.keep, "cpu_s": round(time.process_time() - cpu0, 2), "wall_s": round(time.perf_counter() - wall0, 2),
                        "deleted_heartbeats": deleted["heartbeats"], "deleted_events": deleted["events"],
                        "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
                with store.engine.connect() as conn:
                    most = conn.scalar(select(func.max(select(func.count()).select_from(HEARTBEATS).group_by(HEARTBEATS.c.shop_id, HEARTBEATS.c.node_id)
                                                      .subquery().c[0])))
                print(json.dumps({"trial": trial, "form": form, "most_heartbeats_of_a_node_after": most}), flush=True)
            finally:
                store.engine.dispose()
                remove_db(work)


def storm_bench(base: Path, args: argparse.Namespace) -> None:
    """Every node of the fleet falls silent at once: the presence sweeps that mark them, per ``presence.sweep_max_changes``.

    For each bound of ``--storm`` (0 = no bound, as before 2026-11-30), on a fresh copy of the first-sight database: the
    sweep at 7 intervals of silence, then one a second until a sweep changes nothing. Prints each sweep's wall
    milliseconds and changes; the summary has the longest sweep (the writer's stall: every batch behind it waits) and the
    seconds until the whole fleet is offline.
    """
    with create_engine(f"sqlite:///{base}").connect() as conn:
        last = conn.scalar(select(func.max(registry_store.NODES.c.last_seen))) or 0.0
    for bound in (int(x) for x in args.storm.split(",")):
        work = work_copy(base)
        engine = engine_for(work, [])
        store = RegistryStore(engine)
        settings = PresenceSettings(sweep_max_changes=bound or 1_000_000)
        sweeps: list[tuple[float, int]] = []
        try:
            now = last + 7 * single.INTERVAL
            while True:
                t0 = time.perf_counter()
                changes = sum(e.topic == "presence" for e in store.sweep_presence(settings, now))
                if not changes:
                    break
                sweeps.append((time.perf_counter() - t0, changes))
                now += 1.0
        finally:
            engine.dispose()
            remove_db(work)
        print(json.dumps({
            "nodes": args.nodes, "sweep_max_changes": bound or None, "sweeps": len(sweeps), "changes": sum(c for _, c in sweeps),
            "longest_sweep_ms": round(1e3 * max(w for w, _ in sweeps)), "total_sweep_ms": round(1e3 * sum(w for w, _ in sweeps)),
            "all_offline_after_s": len(sweeps) - 1, "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100_000, help="simulated nodes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="heartbeat periods after the first sight (default: %(default)s)")
    p.add_argument("--base", default="/tmp/shopfleet-scale-writer", help="where the first-sight database is kept")
    p.add_argument("--pragmas", default="", help="extra SQLite pragmas per connection, comma-separated")
    p.add_argument("--gc-threshold", default=",".join(map(str, WRITER_GC_THRESHOLDS)),
                   help="gc.set_threshold values after the start-up freeze (default: the writer process's, %(default)s; "
                        "Python's own: 700,10,10)")
    p.add_argument("--sweep-every", type=int, default=20, help="batches between presence sweeps (default: %(default)s)")
    p.add_argument("--retention", action="store_true", help="measure retention, old and new interleaved, instead of the writer")
    p.add_argument("--heartbeats", type=int, default=20, help="--retention: heartbeats per node (default: %(default)s)")
    p.add_argument("--keep", type=int, default=18, help="--retention: retention.heartbeats_per_node (default: %(default)s)")
    p.add_argument("--trials", type=int, default=2, help="--retention: old/new pairs (default: %(default)s)")
    p.add_argument("--checkpointer", action="store_true", help="checkpoint the WAL on a thread of its own, as the writer process does")
    p.add_argument("--no-checkpointer", dest="checkpointer", action="store_false", help="checkpoint in the writer's commits (before 2026-11-30)")
    p.set_defaults(checkpointer=True)
    p.add_argument("--storm", default="", help="measure a presence storm instead: the whole fleet silent at once, swept with "
                   "each presence.sweep_max_changes of this comma-separated list (0: no bound), e.g. 0,5000")
    p.add_argument("--batch", type=int, default=500, help="messages per batch (intake.batch_max_messages; default: %(default)s)")
    p.add_argument("--profile", default="", help="profile rounds 1.. (the steady state) with cProfile: top 30 by own time "
                   "to stderr, the stats to this file")
    p.add_argument("--page-size", type=int, default=0,
                   help="SQLite page size of the databases (a base database of its own per size; default: the registry's)")
    p.add_argument("--with-retention", action="store_true",
                   help="also run the writer's periodic retention and series roll-up after each round (one heartbeat per node, "
                        "as many minute buckets as a deployed 60 s run writes) and print its milliseconds")
    p.add_argument("--history", type=int, default=0,
                   help="with --with-retention: every node starts with this many heartbeats (the first sight's, copied; the "
                        "first sight's samples folded into the roll-ups first) and retention.heartbeats_per_node is this, so "
                        "the count bound deletes what the rounds add, as in a deployed fleet's steady state")
    args = p.parse_args()
    pragmas = [x for x in args.pragmas.split(",") if x]
    start = time.time() - 3600
    if args.page_size:
        registry_db.SQLITE_PAGE_SIZE = args.page_size
    base = Path(args.base) / (f"{args.nodes}.db" if not args.page_size else f"{args.nodes}-p{args.page_size}.db")
    if not base.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        engine = engine_for(base, [])
        upgrade(engine)
        t = time.perf_counter()
        single.run_round(IntakeCore(RegistryStore(engine)), single.stream(args.nodes, 1), start, 0.0, 500, PresenceSettings(), 0)
        with engine.begin() as c:
            c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
        print(f"first sight of {args.nodes} nodes: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if args.retention:
        retention_bench(base, args)
        return 0
    if args.storm:
        storm_bench(base, args)
        return 0
    if args.history:
        base = grow_history(base, args.history)
        engine = engine_for(base, [])
        with engine.begin() as conn:  # the first sight's writer is long dead: fold its rows once, so the bounds may delete them
            while series.Rollups().recover(conn, time.time() + 1e6, 0.0):
                pass
        engine.dispose()
    retention_settings = RetentionSettings(heartbeats_per_node=args.history) if args.history else RetentionSettings()
    work = work_copy(base)
    engine = engine_for(work, pragmas)
    checkpointer = start_checkpointer(engine) if args.checkpointer else None
    store = RegistryStore(engine)
    core = IntakeCore(store)
    gen_s = [0.0, 0.0, 0.0]
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            gen_s[info["generation"]] += time.perf_counter() - began[0]

    gc.callbacks.append(on_gc)
    gc.collect()
    gc.freeze()  # as the writer process does at start-up
    gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    presence = PresenceSettings()
    profiler = cProfile.Profile() if args.profile else None
    try:
        for r in range(args.rounds + 1):
            if profiler is not None and r == 1:  # the steady state: round 0 loads every cursor and presence
                profiler.enable()
            t0 = start + (r + 1) * single.INTERVAL
            msgs = scattered(args.nodes, r + 2)
            raws = [(t, payload % (t0 + single.INTERVAL * k / args.nodes), t0 + single.INTERVAL * k / args.nodes)
                    for k, (t, payload, _) in enumerate(msgs)]
            gen_s[:] = [0.0, 0.0, 0.0]
            sweep_cpu, sweeps = 0.0, 0
            batch_s: list[float] = []
            io0, cpu0, wall0 = io_counters(), time.process_time(), time.perf_counter()
            for n, k in enumerate(range(0, len(raws), args.batch)):
                raw = raws[k:k + args.batch]
                now = raw[-1][2] + 0.05
                if args.sweep_every and n % max(1, args.sweep_every * 500 // args.batch) == 0:
                    s0 = time.process_time()
                    store.sweep_presence(presence, now)
                    sweep_cpu, sweeps = sweep_cpu + time.process_time() - s0, sweeps + 1
                b0 = time.perf_counter()
                core.process_batch(raw, now)
                batch_s.append(time.perf_counter() - b0)
            cpu, wall, io1 = time.process_time() - cpu0, time.perf_counter() - wall0, io_counters()
            m = len(raws)
            retention: dict[str, Any] = {}
            if args.with_retention:
                c0, w0 = time.process_time(), time.perf_counter()
                deleted = store.enforce_retention(retention_settings, raws[-1][2] + 0.1)
                retention = {"retention_cpu_ms": round(1e3 * (time.process_time() - c0)), "retention_wall_ms": round(1e3 * (time.perf_counter() - w0)),
                             "retention_deleted": deleted}
            print(json.dumps({
                "round": r, "nodes": args.nodes, "batch": args.batch, "page_size": registry_db.SQLITE_PAGE_SIZE, "pragmas": args.pragmas, "checkpointer": args.checkpointer, "gc_threshold": args.gc_threshold,
                "cpu_us_per_msg": round(1e6 * cpu / m, 1), "wall_us_per_msg": round(1e6 * wall / m, 1),
                "gc_us_per_msg": round(1e6 * sum(gen_s) / m, 1), "gc_ms_by_generation": [round(1e3 * x) for x in gen_s],
                "sweep_ms": round(1e3 * sweep_cpu / max(sweeps, 1), 1),
                "batch_ms_p50_p99_max": [round(1e3 * sorted(batch_s)[int(q * (len(batch_s) - 1))], 1) for q in (0.5, 0.99, 1.0)],
                "read_calls_per_msg": round((io1["syscr"] - io0["syscr"]) / m, 2), "read_kb_per_msg": round((io1["rchar"] - io0["rchar"]) / m / 1024, 1),
                "write_calls_per_msg": round((io1["syscw"] - io0["syscw"]) / m, 2), "write_kb_per_msg": round((io1["wchar"] - io0["wchar"]) / m / 1024, 1),
                **retention, "wal_mb": round(Path(f"{work}-wal").stat().st_size / 2**20, 1) if Path(f"{work}-wal").exists() else 0,
                "checkpoints": checkpointer.checkpoints if checkpointer else None,
                "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
            profiler.dump_stats(args.profile)
    finally:
        if checkpointer is not None:
            checkpointer.stop()
        engine.dispose()
        remove_db(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Retention on PostgreSQL at fleet scale: the old ``row_number()`` form against the incremental one (issue #15).

In a schema of its own (dropped at the end) on ``--url`` (default: the tests' server), builds
``--nodes`` nodes with ``--heartbeats`` heartbeats each (``generate_series``, ids in arrival
order), then times, on the same table: two runs of the old form (bench/scale_writer.py's
``old_retention``: the first deletes the excess beyond ``--heartbeats - 2``, the second nothing),
two more heartbeats per node, two cycles of the incremental
:meth:`RegistryStore.enforce_retention` (the first deletes, the second finds nothing), two more
heartbeats per node, and the old form's two runs again. One JSON line per run, with the load average.

    .venv/bin/python bench/retention_pg.py [--nodes 100000] [--heartbeats 20] [--url postgresql+psycopg://...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sqlalchemy as sa
from scale_writer import old_retention  # bench/scale_writer.py

from fleet_controller.registry import store as registry_store
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import NODES, SHOPS, RegistryStore
from fleet_controller.settings import RetentionSettings

NOW = 1e6  # after every row's received_at (1,000 + 10 s a round), and the age bound: no age deletes, only the count bound


def add_heartbeats(conn: sa.Connection, nodes: int, first: int, last: int) -> None:
    """Heartbeats ``first``..``last`` of every node, round by round (ids grow with received_at)."""
    conn.exec_driver_sql(
        "INSERT INTO heartbeats (shop_id, node_id, epoch, seq, ts, received_at, outbox_depth, metrics, pipelines) "
        "SELECT 's' || (i / 3), 'n' || i, 'e', r, 1000 + r * 10, 1000 + r * 10, 0, '{}', '{}' "
        f"FROM generate_series({first}, {last}) r, generate_series(0, {nodes - 1}) i ORDER BY r, i")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100_000, help="nodes, three per shop (default: %(default)s)")
    p.add_argument("--heartbeats", type=int, default=20, help="heartbeats per node at the start (default: %(default)s)")
    p.add_argument("--url", default=os.environ.get("SHOPFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = p.parse_args()
    n, h = args.nodes, args.heartbeats
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        engine = create_engine(f"{args.url}{'&' if '?' in args.url else '?'}options=-csearch_path%3D{schema}")
        upgrade(engine)
        with engine.begin() as c:
            c.execute(sa.insert(SHOPS), [{"id": f"s{i}", "name": "x", "region": "", "labels": {}, "timezone": "UTC", "created_at": 0}
                                         for i in range((n + 2) // 3)])
            c.execute(sa.insert(NODES), [{"shop_id": f"s{i // 3}", "node_id": f"n{i}", "first_seen": 0, "last_seen": 0} for i in range(n)])
            add_heartbeats(c, n, 1, h)
        with engine.begin() as c:
            c.exec_driver_sql("ANALYZE")
        store = RegistryStore(engine)
        settings = RetentionSettings(heartbeats_per_node=h - 2, heartbeat_max_age_s=NOW)
        top = h

        def timed(form: str, runs: int) -> None:
            nonlocal top
            with engine.begin() as c:
                add_heartbeats(c, n, top + 1, top + 2)
            top += 2
            for run in range(runs):
                t0 = time.perf_counter()
                deleted = old_retention(store, settings, NOW) if form == "old" else store.enforce_retention(settings, NOW)
                print(json.dumps({"engine": "postgresql", "form": form, "run": run, "nodes": n, "heartbeats_per_node": h,
                                  "wall_s": round(time.perf_counter() - t0, 2), "deleted_heartbeats": deleted["heartbeats"],
                                  "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)

        timed("old", 2)
        timed("new", 2 * registry_store.RETENTION_CYCLE_RUNS)
        timed("old", 2)
        engine.dispose()
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())

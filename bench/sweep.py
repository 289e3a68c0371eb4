"""The presence sweep of one partitioned replica: statements per sweep against the whole fleet's sweep.

Every controller sweeps presence once a second (``presence.sweep_interval_s``). One replica
sweeps the whole fleet in one statement. A partitioned replica (``intake.partitions``) sweeps only
its own shops and passes them to :meth:`RegistryStore.sweep_presence` as an ``IN`` list, in chunks of
``SWEEP_SHOPS_CHUNK`` shops. Each chunk is a statement that walks every online node through the
index on ``presence``, so the sweep's cost grows with the chunks. This benchmark builds ``--nodes``
nodes (``--nodes-per-shop`` each, as bench/scale.py's fleet: 3), all online and heard from just now,
so a sweep finds nothing to change: the cost a running fleet pays every second. It then times,
alternated, ``--repeats`` sweeps of each kind:

- ``whole``: the fleet in one statement (one replica; the reference);
- ``chunked``: the shops of half the partitions (one of two replicas) in chunks of ``--old-chunk``
  (2,000, the chunk before 2026-12-01);
- ``one_statement``: the same shops as the code sweeps them now: on SQLite in chunks of
  ``SWEEP_SHOPS_CHUNK`` (30,000: one statement), on PostgreSQL as one array parameter
  (``SWEEP_SHOPS_ARRAY``: ``shop_id = ANY(:shops)``, which the server hashes).

It prints the median milliseconds of each kind and the ratio of each to ``whole``, per database
(``--db sqlite|postgresql|both``; PostgreSQL in a fresh schema of ``--pg-url``, dropped
afterwards). Last line: a JSON summary.

    .venv/bin/python bench/sweep.py [--db both] [--nodes 100000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ingest import drop_pg_schema, fresh_pg_schema
from fleet_controller.registry import store as registry_store
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.leases import partition_of
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import NODES, SHOPS, RegistryStore
from fleet_controller.settings import PresenceSettings

PARTITIONS = 16


def build(url: str, nodes: int, per_shop: int, now: float) -> tuple[RegistryStore, list[str]]:
    """Return a store on ``url`` holding ``nodes`` online nodes, and the shops of half the partitions."""
    engine = create_engine(url)
    upgrade(engine)
    shops = [f"shop-{i:06d}" for i in range((nodes + per_shop - 1) // per_shop)]
    with engine.begin() as conn:
        conn.execute(SHOPS.insert(), [{"id": s, "name": "", "region": "", "labels": {}, "timezone": "UTC", "created_at": now} for s in shops])
        rows = [{"shop_id": shops[i // per_shop], "node_id": f"node-{i % per_shop}", "presence": "online", "presence_reason": "message",
                 "session": 1, "last_seen": now, "facts_at": now, "first_seen": now, "heartbeat_interval_s": 10.0, "gaps": []}
                for i in range(nodes)]
        for i in range(0, len(rows), 10_000):
            conn.execute(NODES.insert(), rows[i:i + 10_000])
    held = [s for s in shops if partition_of(s, PARTITIONS) < PARTITIONS // 2]
    return RegistryStore(engine), held


def measure(store: RegistryStore, held: list[str], now: float, repeats: int, old_chunk: int) -> dict[str, float]:
    """Return the median milliseconds per sweep of each kind, the kinds alternated round by round."""
    settings = PresenceSettings()
    new_chunk = registry_store.SWEEP_SHOPS_CHUNK
    kinds = {"whole": (None, new_chunk, True), "chunked": (held, old_chunk, False), "one_statement": (held, new_chunk, True)}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    try:
        for r in range(repeats + 1):
            for kind, (shops, chunk, array) in kinds.items():
                registry_store.SWEEP_SHOPS_CHUNK, registry_store.SWEEP_SHOPS_ARRAY = chunk, array
                t0 = time.perf_counter()
                changes = store.sweep_presence(settings, now + 1.0, shops=shops)
                if r:  # round 0 warms the caches
                    times[kind].append((time.perf_counter() - t0) * 1000)
                if changes:
                    raise SystemExit(f"sweep changed {len(changes)} node(s); the fleet was built fresh, so nothing should change")
    finally:
        registry_store.SWEEP_SHOPS_CHUNK, registry_store.SWEEP_SHOPS_ARRAY = new_chunk, True
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both", help="registry database(s) (default: %(default)s)")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                   help="PostgreSQL database; the run uses a fresh schema in it (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=100_000, help="nodes in the fleet (default: %(default)s)")
    p.add_argument("--nodes-per-shop", type=int, default=3, help="nodes per shop (default: %(default)s, as bench/scale.py)")
    p.add_argument("--repeats", type=int, default=15, help="timed sweeps of each kind (default: %(default)s)")
    p.add_argument("--old-chunk", type=int, default=2000, help="shops per statement of the reference (default: %(default)s)")
    args = p.parse_args()
    if args.nodes < 1 or args.nodes_per_shop < 1 or args.repeats < 1 or args.old_chunk < 1:
        p.error("--nodes, --nodes-per-shop, --repeats and --old-chunk must be at least 1")
    results = []
    for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
        schema = None
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
            if db == "sqlite":
                url = f"sqlite:///{tmp}/registry.db"
            else:
                url, schema = fresh_pg_schema(args.pg_url)
            try:
                now = time.time()
                t0 = time.perf_counter()
                store, held = build(url, args.nodes, args.nodes_per_shop, now)
                print(f"{db}: {args.nodes} nodes in {-(-args.nodes // args.nodes_per_shop)} shops built in {time.perf_counter() - t0:.0f} s; "
                      f"one replica of two sweeps {len(held)} shops", file=sys.stderr, flush=True)
                ms = measure(store, held, now, args.repeats, args.old_chunk)
                store.engine.dispose()
            finally:
                if schema is not None:
                    drop_pg_schema(args.pg_url, schema)
        chunks_old = -(-len(held) // args.old_chunk)
        chunks_new = -(-len(held) // registry_store.SWEEP_SHOPS_CHUNK)
        print(f"  {db}: whole fleet {ms['whole']} ms; {len(held)} shops in {chunks_old} statement(s) {ms['chunked']} ms "
              f"({ms['chunked'] / ms['whole']:.2f}x); in {chunks_new} statement(s) {ms['one_statement']} ms "
              f"({ms['one_statement'] / ms['whole']:.2f}x)")
        results.append({"db": db, "nodes": args.nodes, "shops_swept": len(held), "ms_whole": ms["whole"],
                        "ms_chunked": ms["chunked"], "statements_chunked": chunks_old, "ms_one_statement": ms["one_statement"],
                        "statements_one": chunks_new, "ratio_chunked": round(ms["chunked"] / ms["whole"], 2),
                        "ratio_one_statement": round(ms["one_statement"] / ms["whole"], 2)})
    print(json.dumps({"bench": "sweep", "results": results, "load_avg_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

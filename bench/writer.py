"""Writer benchmark: CPU time per message of the registry writer alone, caught up and lagging.

What bench/ingest.py and bench/scale.py measure end to end, reduced to the part that bounds them:
:meth:`IntakeCore.process_batch` (parse, dedupe, store in one transaction) on pre-encoded
heartbeats of ``--nodes`` nodes in batches of ``--batch`` (the intake's default 500), in this
process, no MQTT, with the garbage collector set up as in the writer process (start-up heap frozen,
``WRITER_GC_THRESHOLDS``). Figures are CPU seconds of this process (``time.process_time``) per message, the
figure the machine's load moves least; on PostgreSQL the server's own CPU is not in it (its wall
time per batch is printed beside).

Two modes, measured in the same run on the same database, round after round:

* ``caught up``: every message is stored the moment it is sent, the presence sweep runs every
  few batches (``--sweep-every``) as the controller's ``presence.sweep_interval_s`` would;
* ``lagging``: the same on a second database, but every message is stored ``--lag`` seconds
  (default 40, more than ``stale_after_intervals`` x 10 s) after it was sent and received (the
  backlog waits in the intake); the sweep runs at the time of the store.

Each round is one heartbeat period of the fleet on a simulated clock (the writer is told the time),
so the machine's speed changes no presence: a node is silent only if the writer makes it look so. A writer whose cost depends on lag (a sweep that
  judges silence by the time of the commit, a revival with a presence change and an event row per
  node) shows it here as a higher cost per message and as presence changes.

The reference, measured right after each round on the same payloads: the stdlib's ``json.loads``
(CPU per message), so each figure is also given as a multiple of it (``x_json_loads``), which the
machine's load moves less than microseconds. ``lag_ratio`` = lagging / caught-up, in those
multiples (1.0 = the cost does not depend on lag). Last line: a JSON summary.

    .venv/bin/python bench/writer.py [--db sqlite|postgresql] [--nodes 3000] [--rounds 4] [--lag 40]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa

from edge_agent.protocol import Heartbeat, NodeFacts, Topics, encode
from fleet_controller.intake.core import WRITER_GC_THRESHOLDS, IntakeCore
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.store import RegistryStore
from fleet_controller.settings import PresenceSettings

FACTS = NodeFacts(hostname="pi", arch="arm64", os="Debian 12", kernel="6.6", node_class="pi", cpu_count=4, cpu_load_1m=0.4,
                  mem_total_bytes=4 << 30, mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30,
                  cpu_temp_c=51.2, onnx_providers=("CPUExecutionProvider",), agent_version="0.1.0")
INTERVAL = 10.0


def stream(nodes: int, seq: int) -> list[tuple[str, bytes, int]]:
    """Heartbeat ``seq`` of every node, with its ``ts`` left as a %-placeholder: ``(topic, payload template, node)``."""
    out = []
    for i in range(nodes):
        shop, node = f"shop-{i // 3:05d}", f"node-{i % 3}"
        hb = Heartbeat(shop=shop, node=node, epoch="bench", seq=seq, ts=1.0, interval_s=INTERVAL, facts=FACTS, metrics={"fps": 14.5})
        out.append((Topics.node(shop, node, "telemetry"), encode(hb).replace(b"%", b"%%").replace(b'"ts":1.0', b'"ts":%.6f'), i))
    return out


def run_round(core: IntakeCore, msgs: list[tuple[str, bytes, int]], start: float, lag: float, batch: int,
              presence: PresenceSettings, sweep_every: int) -> dict[str, float]:
    """Store one heartbeat period of the fleet in batches; return the figures.

    The clock is simulated (the writer is told ``now``), so how fast this machine runs changes no
    presence: node ``i`` of ``n`` sends at ``start + i / n x INTERVAL``; its message is received
    then and its batch stored ``lag`` seconds later (the backlog waits in the intake). The
    presence sweep runs before every ``sweep_every``-th batch (0: never) at the batch's time.
    """
    n_nodes = len(msgs)
    sent = [start + INTERVAL * i / n_nodes for _, _, i in msgs]
    raws = [(t, p % ts, ts) for (t, p, _), ts in zip(msgs, sent, strict=True)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    changes = 0
    for n, k in enumerate(range(0, len(raws), batch)):
        raw = raws[k:k + batch]
        now = raw[-1][2] + lag + 0.05
        if sweep_every and n % sweep_every == 0:
            changes += len(core.registry.sweep_presence(presence, now))
        out = core.process_batch(raw, now)
        changes += sum(1 for e in out.events if e.topic == "presence")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ref0 = time.process_time()
    for _, payload, _ in raws:  # the reference, right after: the stdlib's json.loads of the same payloads
        json.loads(payload)
    ref = time.process_time() - ref0
    return {"cpu_us_per_msg": 1e6 * cpu / len(raws), "wall_us_per_msg": 1e6 * wall / len(raws), "presence_changes": changes,
            "ref_us_per_msg": 1e6 * ref / len(raws), "x_ref": cpu / ref}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite", help="registry database (default: %(default)s)")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                   help="PostgreSQL database for --db postgresql; the run uses a fresh schema in it, dropped afterwards")
    p.add_argument("--nodes", type=int, default=3000, help="simulated nodes (default: %(default)s)")
    p.add_argument("--batch", type=int, default=500, help="messages per batch (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of each mode, interleaved (default: %(default)s)")
    p.add_argument("--lag", type=float, default=40.0, help="seconds the lagging mode's messages are old when stored (default: %(default)s)")
    p.add_argument("--sweep-every", type=int, default=4,
                   help="batches between presence sweeps (default: %(default)s, about one a second at the drain rates here)")
    args = p.parse_args()
    schemas: list[str] = []
    admin = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT") if args.db == "postgresql" else None

    def fresh_url() -> str:
        if admin is None:
            return f"sqlite:///{tempfile.mkdtemp(prefix='bench-writer-')}/registry.db"
        schemas.append(f"bench_{uuid.uuid4().hex[:10]}")
        with admin.connect() as c:
            c.execute(sa.text(f'create schema "{schemas[-1]}"'))
        return f"{args.pg_url}{'&' if '?' in args.pg_url else '?'}options=-csearch_path%3D{schemas[-1]}"

    presence = PresenceSettings()
    modes = ("caught_up", "lagging")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    engines = []
    try:
        cores = {}
        lag = {"caught_up": 0.0, "lagging": args.lag}
        start = time.time() - args.rounds * INTERVAL - args.lag - 60
        for mode in modes:  # a database each: the lag is the whole stream's, as in a controller
            engines.append(create_engine(fresh_url()))
            upgrade(engines[-1])
            cores[mode] = IntakeCore(RegistryStore(engines[-1]))
            run_round(cores[mode], stream(args.nodes, 1), start, lag[mode], args.batch, presence, 0)  # first sight: not measured
        # The collector as the writer process sets it up (fleet_controller.intake.core._init_writer).
        gc.freeze()
        gc.set_threshold(*WRITER_GC_THRESHOLDS)
        for r in range(args.rounds):
            for mode in modes:
                res = run_round(cores[mode], stream(args.nodes, r + 2), start + (r + 1) * INTERVAL, lag[mode], args.batch, presence,
                                args.sweep_every)
                results[mode].append(res)
                print(f"  round {r + 1} {mode:>9}: {res['cpu_us_per_msg']:.1f} us CPU ({res['x_ref']:.1f}x json.loads's "
                      f"{res['ref_us_per_msg']:.1f} us), {res['wall_us_per_msg']:.1f} us wall per message, "
                      f"{res['presence_changes']} presence changes", file=sys.stderr, flush=True)
    finally:
        for e in engines:
            e.dispose()
        if admin is not None:
            with admin.connect() as c:
                for schema in schemas:
                    c.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
            admin.dispose()

    def med(mode: str, key: str) -> float:
        values = sorted(x[key] for x in results[mode])
        return values[len(values) // 2]

    summary: dict[str, Any] = {"db": args.db, "nodes": args.nodes, "batch": args.batch, "lag_s": args.lag, "rounds": args.rounds}
    for mode in results:
        summary[f"{mode}_cpu_us_per_msg"] = round(med(mode, "cpu_us_per_msg"), 1)
        summary[f"{mode}_x_json_loads"] = round(med(mode, "x_ref"), 2)
        summary[f"{mode}_wall_us_per_msg"] = round(med(mode, "wall_us_per_msg"), 1)
        summary[f"{mode}_presence_changes"] = sum(int(x["presence_changes"]) for x in results[mode])
    summary["json_loads_us_per_msg"] = round(sorted(x["ref_us_per_msg"] for m in results for x in results[m])[len(results) * args.rounds // 2], 1)
    summary["lag_ratio"] = round(summary["lagging_x_json_loads"] / summary["caught_up_x_json_loads"], 2)
    summary["load_avg_1m"] = round(os.getloadavg()[0], 2)
    summary["machine"] = f"{os.cpu_count()} cores {platform.machine()}"
    print(f"{args.db}: writer CPU per message (median of {args.rounds} rounds): caught up {summary['caught_up_cpu_us_per_msg']} us "
          f"= {summary['caught_up_x_json_loads']}x json.loads, lagging {args.lag:.0f} s {summary['lagging_cpu_us_per_msg']} us "
          f"= {summary['lagging_x_json_loads']}x (lag ratio {summary['lag_ratio']}); presence changes "
          f"caught up {summary['caught_up_presence_changes']}, lagging {summary['lagging_presence_changes']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

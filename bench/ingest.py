"""Ingest benchmark: the controller's sustained validated-and-stored rate vs a bare paho subscriber.

N simulated nodes' heartbeats are published through a real Mosquitto into persistent sessions
(QoS 1) while every consumer is away, so each consumer then drains the very same backlog as fast
as it can; the publisher's speed does not enter any figure. Per database (SQLite, PostgreSQL or
both, ``--db``) a bare paho subscriber drains its copy of the backlog and right after it the
controller drains its own, so each ratio pairs two drains made under the same machine load. The
first heartbeat of each node is warm-up (the controller creates the shop and node rows then) and
rates are measured over the rest: the sustained rate of a fleet the registry already knows. The
bare subscriber only counts messages (paho's own ceiling); the controller validates each with the
wire protocol, dedupes it, stores it in its registry and acknowledges it after the commit.
PostgreSQL runs in a fresh schema of its own (dropped afterwards) of ``--pg-url``'s database.

The broker runs with the persistence, queue and in-flight lines ``shopfleet broker-config`` writes for
a fleet of ``--nodes`` nodes at one heartbeat per 10 s (``--broker deployed``, the default: a window of
1,000 messages in flight per client), or with the test harness's lines (``--broker harness``: 100 in
flight, no persistence; every round before 2026-12-01 ran those).

Goals (issue 15): ratio >= 0.8 on SQLite and >= 0.6 on PostgreSQL. Where the time goes: the CPU
seconds per 1,000 messages of the controller process and of its registry writer child during the
sustained drain, against the bare subscriber's (``cpu_ratio``: bare CPU / controller + writer CPU,
a figure the machine's load moves far less than the rates). Last line: a JSON summary.

    .venv/bin/python bench/ingest.py [--db sqlite|postgresql|both] [--nodes 10000] [--per-node 4] [--broker deployed|harness]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho
import psutil
import sqlalchemy as sa
from sqlalchemy import func, select

from bench.scale import broker_delivery
from edge_agent.protocol import Heartbeat, NodeFacts, Topics, encode
from fleet_controller.registry.db import create_engine
from fleet_controller.registry.migrations import upgrade
from fleet_controller.registry.models import HeartbeatRecord
from fleet_controller.service import ControllerService
from fleet_controller.settings import load_settings
from shopfleet.broker import BrokerProcess

FACTS = NodeFacts(hostname="pi", arch="arm64", os="Debian 12", kernel="6.6", node_class="pi", cpu_count=4, cpu_load_1m=0.4,
                  mem_total_bytes=4 << 30, mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30,
                  cpu_temp_c=51.2, onnx_providers=("CPUExecutionProvider",), agent_version="0.1.0")


def make_session(port: int, client_id: str) -> None:
    """Create a persistent session with the controller's subscriptions, then leave it."""
    done = threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe([(t, 1) for t in Topics.controller_subscriptions])
    if not done.wait(10):
        raise RuntimeError("no SUBACK from the broker")
    c.disconnect()
    c.loop_stop()


def publish_stream(port: int, nodes: int, per_node: int) -> int:
    """Publish ``per_node`` heartbeats from each of ``nodes`` nodes (QoS 1); return the count."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = []
    for seq in range(1, per_node + 1):
        for i in range(nodes):
            shop, node = f"shop-{i // 3:05d}", f"node-{i % 3}"
            hb = Heartbeat(shop=shop, node=node, epoch="bench", seq=seq, interval_s=10, facts=FACTS, metrics={"fps": 14.5})
            infos.append(c.publish(Topics.node(shop, node, "telemetry"), encode(hb), qos=1))
            if len(infos) % 5000 == 0:
                infos[-1].wait_for_publish(60)
                print(f"  published {len(infos)}/{nodes * per_node}", file=sys.stderr, flush=True)
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()
    return len(infos)


def drain_bare(port: int, client_id: str, warmup: int, expected: int, timeout: float) -> tuple[float, float]:
    """Connect the bare subscriber to its session; return its rate on the messages after the first ``warmup``
    and the CPU seconds per 1,000 of them (this process: the bench is idle meanwhile)."""
    got = 0
    marks: dict[str, float] = {}
    done = threading.Event()

    def on_message(client, userdata, msg):
        nonlocal got
        got += 1
        if got == warmup:
            marks["start"] = time.perf_counter()
            marks["cpu_start"] = cpu_seconds(psutil.Process())["controller"]
        if got >= expected:
            marks["end"] = time.perf_counter()
            marks["cpu_end"] = cpu_seconds(psutil.Process())["controller"]
            done.set()

    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not done.wait(timeout):
        raise RuntimeError(f"bare subscriber got {got}/{expected} messages in {timeout}s")
    c.disconnect()
    c.loop_stop()
    n = expected - warmup
    return n / (marks["end"] - marks["start"]), round(1000 * (marks["cpu_end"] - marks["cpu_start"]) / n, 3)


def cpu_seconds(proc: psutil.Process) -> dict[str, float]:
    """CPU seconds (user + system) so far of this process ("controller") and of its children ("writer")."""
    t = proc.cpu_times()
    out = {"controller": t.user + t.system, "writer": 0.0}
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            out["writer"] += c.user + c.system
        except psutil.Error:
            pass
    return out


async def drain_controller(
    port: int, client_id: str, db_url: str, warmup: int, expected: int, timeout: float, writer: str, ack_nodes: bool = True,
    intake: dict[str, object] | None = None,
) -> tuple[float, float, int, dict[str, float]]:
    """Start the controller on its session; return its sustained rate after ``warmup`` stored, its first-sight rate,
    rows stored, and CPU seconds per 1,000 messages of the sustained drain (controller process, writer child)."""
    settings = load_settings(None, {"db_url": db_url, "broker": {"port": port, "client_id": client_id}, "api": {"port": 0},
                                    "retention": {"interval_s": 3600}, "intake": {"writer": writer, "ack_nodes": ack_nodes, **(intake or {})}}, environ={})
    svc = ControllerService(settings, migrate=False)
    await svc.start()
    me = psutil.Process()
    cpu_marks: dict[str, float] = {}
    t0 = time.perf_counter()
    deadline = t0 + timeout
    last_report = t0
    t_warm = None
    while svc.intake.stored_total < expected:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"controller stored {svc.intake.stored_total}/{expected} in {timeout}s")
        await asyncio.sleep(0.005)
        if t_warm is None and svc.intake.stored_total >= warmup:
            t_warm, n_warm = time.perf_counter(), svc.intake.stored_total
            cpu_marks = cpu_seconds(me)
        if time.perf_counter() - last_report > 2:
            last_report = time.perf_counter()
            print(f"  controller stored {svc.intake.stored_total}/{expected}", file=sys.stderr, flush=True)
    t_end = time.perf_counter()
    cpu_end = cpu_seconds(me)
    per_k = {k: round(1000 * (cpu_end.get(k, 0.0) - cpu_marks.get(k, 0.0)) / (expected - n_warm), 3) for k in cpu_end}
    m = svc.metrics_registry
    n = m.get_sample_value("shopfleet_controller_batch_messages_count")
    print(f"  {n:.0f} batches, {m.get_sample_value('shopfleet_controller_batch_messages_sum') / n:.0f} messages and "
          f"{1000 * m.get_sample_value('shopfleet_controller_batch_seconds_sum') / n:.1f} ms each on average; intake queue "
          f"high water {svc.intake.queue_high_water}", file=sys.stderr)
    await svc.stop()
    with create_engine(db_url).connect() as conn:
        rows = conn.scalar(select(func.count()).select_from(HeartbeatRecord.__table__))
    return (expected - n_warm) / (t_end - t_warm), n_warm / (t_warm - t0), rows, per_k


def fresh_pg_schema(admin_url: str) -> tuple[str, str]:
    """Create an empty schema in ``admin_url``'s database; return the URL that uses it and the schema's name."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'create schema "{schema}"'))
    eng.dispose()
    sep = "&" if "?" in admin_url else "?"
    return f"{admin_url}{sep}options=-csearch_path%3D{schema}", schema


def drop_pg_schema(admin_url: str, schema: str) -> None:
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
    eng.dispose()


GOALS = {"sqlite": 0.8, "postgresql": 0.6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite", help="registry database(s) to measure (default: %(default)s)")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                   help="PostgreSQL database for --db postgresql/both; the run uses a fresh schema in it (default: %(default)s)")
    p.add_argument("--nodes", type=int, default=10_000, help="simulated nodes (default: %(default)s)")
    p.add_argument("--per-node", type=int, default=4, help="heartbeats per node in the stream (default: %(default)s)")
    p.add_argument("--writer", choices=["process", "thread"], default="process", help="intake.writer of the controller (default: %(default)s)")
    p.add_argument("--ack-nodes", choices=["on", "off"], default="off",
                   help="intake.ack_nodes: publish stored-acks after each commit (default: %(default)s, as the controller's)")
    p.add_argument("--batch", type=int, default=None, help="intake.batch_max_messages (default: the controller's)")
    p.add_argument("--broker", choices=["deployed", "harness"], default="deployed",
                   help="the broker's persistence, queue and in-flight lines: deployed, as 'shopfleet broker-config' writes them for "
                        "--nodes nodes at a heartbeat per 10 s, or the test harness's (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=180, help="give up a drain after this many seconds")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    (work / "broker").mkdir()
    broker = BrokerProcess(workdir=work / "broker", delivery=broker_delivery(args.broker, args.nodes, 10.0, work / "broker")).start()
    schemas: list[str] = []
    results = []
    failed = False
    try:
        urls = {}
        for db in dbs:
            if db == "sqlite":
                urls[db] = f"sqlite:///{work / 'controller.db'}"
            else:
                urls[db], schema = fresh_pg_schema(args.pg_url)
                schemas.append(schema)
            upgrade(create_engine(urls[db]))
            make_session(broker.port, f"bench-bare-{db}")
            make_session(broker.port, f"bench-controller-{db}")
        t0 = time.perf_counter()
        total = publish_stream(broker.port, args.nodes, args.per_node)
        print(f"published {total} heartbeats of {args.nodes} nodes in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        warmup = args.nodes  # the first heartbeat of every node: first sight, not the sustained rate
        for db in dbs:
            bare, bare_cpu = drain_bare(broker.port, f"bench-bare-{db}", warmup, total, args.timeout)
            ctl, first_sight, rows, cpu = asyncio.run(
                drain_controller(broker.port, f"bench-controller-{db}", urls[db], warmup, total, args.timeout, args.writer,
                                 args.ack_nodes == "on", {} if args.batch is None else {"batch_max_messages": args.batch}))
            if rows != total:
                print(f"ERROR: {db}: {rows} heartbeat rows stored, expected {total}", file=sys.stderr)
                failed = True
            ratio = ctl / bare
            results.append({"db": db, "controller_msgs_per_s": round(ctl, 1), "bare_msgs_per_s": round(bare, 1), "ratio": round(ratio, 3),
                            "goal": GOALS[db], "met": ratio >= GOALS[db], "first_sight_msgs_per_s": round(first_sight, 1),
                            "nodes_at_10s_capacity": int(ctl * 10), "cpu_s_per_1k_msgs": cpu, "bare_cpu_s_per_1k_msgs": bare_cpu,
                            "cpu_ratio": round(bare_cpu / max(cpu["controller"] + cpu["writer"], 1e-9), 3), "rows": rows,
                            "load_avg_1m": round(os.getloadavg()[0], 2)})
            print(f"{db}: first sight of {args.nodes} nodes (creating shops and nodes; not in the ratio): {first_sight:,.0f} msg/s")
            print(f"{db}: controller (validate + dedupe + store, {args.writer} writer): {ctl:,.0f} msg/s; "
                  f"CPU per 1,000 messages: controller {cpu['controller']:.3f} s, writer {cpu['writer']:.3f} s")
            print(f"{db}: bare paho subscriber on the same backlog, just before: {bare:,.0f} msg/s; CPU per 1,000 messages {bare_cpu:.3f} s")
            print(f"{db}: ratio {ratio:.2f} (goal >= {GOALS[db]}: {'met' if ratio >= GOALS[db] else 'NOT met'}); "
                  f"keeps up with {ctl * 10:,.0f} nodes at one heartbeat per 10 s")
    finally:
        broker.cleanup()
        for schema in schemas:
            drop_pg_schema(args.pg_url, schema)
    print(json.dumps({
        "nodes": args.nodes, "messages": args.nodes * args.per_node, "broker": args.broker, "writer": args.writer, "ack_nodes": args.ack_nodes,
        "machine": f"{os.cpu_count()} cores {platform.machine()}", "results": results,
    }))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale benchmark: how many simulated nodes at one heartbeat per 10 s one controller holds, and where lag starts.

A real Mosquitto (persistence, queue and in-flight window as ``shopfleet broker-config`` writes them for the fleet:
``--broker deployed``; its password and ACL lines are left out, because a publisher here speaks for many nodes), the real controller (its own process, with its registry writer child, exactly as
`shopfleet controller` runs it) and a few fast publisher processes that play the nodes: each node
sends a QoS 1 heartbeat every ``--interval`` seconds at its own phase, from a payload encoded once
per node (only ``ts`` and ``seq`` are filled in per message), written as MQTT packets straight to a
socket (``--load raw``; :class:`RawPublisher`), so the publishers cost little of the machine that
the controller under test shares (``--load paho``, a paho client per publisher, costs ten times as
much a message). The fleet ramps in steps (``--steps``, default 10k, 20k, 40k, 60k, 80k, 100k nodes) of
``--step-s`` seconds each, after a warm-up in which every node of the largest step sends its first
heartbeat and the controller creates it (first sight happens once in a fleet's life; it is not
what a running fleet costs, see bench/ingest.py for its rate). Per step, over the part after the first heartbeat period of the step
(the step's nodes settle into their phases), it reports the offered and stored rates, the
receive-to-commit latency p50/p99 (from the controller receiving a message to its batch
committing: the intake's own ``shopfleet_controller_ingest_latency_seconds`` observations, every
one of them), the backlog (published minus stored: what waits in the broker and the intake) and
the CPU each part of the system used (controller process, writer children, Mosquitto, publishers,
PostgreSQL server): where the time goes. A step *lags* when its p99 reaches 1 s or its backlog
grows by more than one second's worth of messages over the measured window; the first such step is
where lag starts.

``--replicas 1,2`` runs the whole ramp once per replica count, each on a fresh database, in the
same run. Several replicas split the fleet by shop (``intake.partitions: --partitions``, leases in
the database, per-shop subscriptions; the shops are registered before the replicas start, as in a
running fleet); a count suffixed ``rr`` (``2rr``) uses the MQTT 5 shared subscription's
round-robin instead (``intake.partitions: 0``), and ``1p`` one replica with partitions. Each run
also reports every replica's share of the stored messages and its compare-and-set conflicts. PostgreSQL (``--db postgresql``) runs in a fresh
schema of ``--pg-url``'s database, dropped afterwards. Every run stops by itself: the ramp's length
is fixed and a controller that cannot keep up only lags. Last line: a JSON summary.

    .venv/bin/python bench/scale.py [--db sqlite|postgresql] [--replicas 1|1,2|1,2,2rr] [--partitions 16] [--steps 10000,20000,...] [--step-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

INTERVAL_S = 10.0
SLOTS = 200  # a heartbeat period cut into slots; each node publishes in its own slot
EPOCH = "scale"
PING_S = 30.0  # the load generator's keepalive (its CONNECT asks for 600 s)
PINGREQ = b"\xc0\x00"


# ----- publishers (child processes) ----------------------------------------------------------------


def node_ids(i: int) -> tuple[str, str]:
    """Shop and node id of simulated node ``i`` (three nodes per shop)."""
    return f"shop-{i // 3:06d}", f"node-{i % 3}"


def publisher(index: int, count: int, port: int, schedule: list[tuple[float, int]], interval: float, stop_at: float,
              published: Any, load: str = "raw") -> None:
    """Play nodes ``index, index + count, ...`` up to the schedule's active count, each once per ``interval``.

    ``schedule`` is ``[(start time, active nodes), ...]``; ``published`` a shared counter of this publisher's messages
    the broker acknowledged (``load`` raw) or handed to paho (``load`` paho, the older and far costlier generator).
    """
    from edge_agent.protocol import Heartbeat, NodeFacts, Topics, encode

    facts = NodeFacts(hostname="pi", arch="arm64", os="Debian 12", kernel="6.6", node_class="pi", cpu_count=4, cpu_load_1m=0.4,
                      mem_total_bytes=4 << 30, mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30,
                      cpu_temp_c=51.2, onnx_providers=("CPUExecutionProvider",), agent_version="0.1.0")
    top = max(n for _, n in schedule)
    mine = range(index, top, count)
    # The payload of each node, encoded once, with %-placeholders for ts and seq (the only fields that change).
    proto = encode(Heartbeat(shop="shop-000000", node="node-0", epoch=EPOCH, seq=111_111_111, ts=1.0, interval_s=interval,
                             facts=facts, metrics={"fps": 14.5}))
    proto = proto.replace(b"%", b"%%").replace(b'"ts":1.0', b'"ts":%.6f').replace(b'"seq":111111111', b'"seq":%d')
    templates: dict[int, tuple[str, bytes]] = {}
    slots: list[list[int]] = [[] for _ in range(SLOTS)]
    for i in mine:
        shop, node = node_ids(i)
        templates[i] = (Topics.node(shop, node, "telemetry"),
                        proto.replace(b'"shop":"shop-000000"', f'"shop":"{shop}"'.encode()).replace(b'"node":"node-0"', f'"node":"{node}"'.encode()))
        slots[(i * 7919) % SLOTS].append(i)  # a prime stride: every prefix of the fleet spreads evenly over the slots
    seqs = dict.fromkeys(mine, 1)  # seq 1 of every node was the warm-up
    client_id = f"scale-pub-{index}-{uuid.uuid4().hex[:6]}"
    if load == "raw":
        raw = RawPublisher(port, client_id)
        topics = {i: RawPublisher.topic(t) for i, (t, _) in templates.items()}

        def send(now: float, due: list[int]) -> int:
            packets = []
            for i in due:
                seqs[i] += 1
                packets.append(raw.packet(topics[i], templates[i][1] % (now, seqs[i])))
            raw.send(packets)
            return raw.acked

        def close() -> None:
            raw.close()
            published.value = raw.acked
    else:
        import paho.mqtt.client as paho

        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id)
        c.max_inflight_messages_set(2000)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", port)
        c.loop_start()
        sent = 0

        def send(now: float, due: list[int]) -> int:
            nonlocal sent
            for i in due:
                seqs[i] += 1
                topic, tpl = templates[i]
                c.publish(topic, tpl % (now, seqs[i]), qos=1)
            sent += len(due)
            return sent

        def close() -> None:
            c.disconnect()
            c.loop_stop()
    slot_s = interval / SLOTS
    tick = time.time()
    slot = int(tick / slot_s) % SLOTS
    while time.time() < stop_at:
        now = time.time()
        active = 0
        for start, nodes in schedule:
            if now >= start:
                active = nodes
        published.value = send(now, [i for i in slots[slot] if i < active])
        slot = (slot + 1) % SLOTS
        tick += slot_s
        delay = tick - time.time()
        if delay > 0:
            time.sleep(delay)
    close()


class RawPublisher:
    """A QoS 1 publisher on a bare socket: MQTT 3.1.1 CONNECT, pipelined PUBLISH packets, PUBACKs counted.

    The load generator of this bench, not a client library: paho builds a message object, a packet
    and an in-flight record per publish (tens of µs), which at 10,000 msg/s took 1.3 of this
    machine's 2 cores and starved the controller it was measuring. Here a publish is one
    ``bytes % (ts, seq)`` and a header, and a slot's packets go out in one ``sendall``; a reader
    thread counts the broker's PUBACKs, which is what ``acked`` (the published count) reports.
    """

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = client_id.encode()
        body = b"\x00\x04MQTT\x04\x02" + (600).to_bytes(2, "big") + len(cid).to_bytes(2, "big") + cid  # clean session, keepalive 600 s
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = _recv_exact(self.sock, 4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"broker refused the load generator's CONNECT: {connack!r}")
        self.acked = 0
        self._pid = 0
        self._next_ping = time.monotonic() + PING_S
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def topic(name: str) -> bytes:
        """A topic as a PUBLISH carries it (length-prefixed), for :meth:`packet`."""
        raw = name.encode()
        return len(raw).to_bytes(2, "big") + raw

    def packet(self, topic: bytes, payload: bytes) -> bytes:
        """One PUBLISH, QoS 1 (``topic`` from :meth:`topic`)."""
        self._pid = self._pid % 0xFFFF + 1
        return b"\x32" + _varint(len(topic) + 2 + len(payload)) + topic + self._pid.to_bytes(2, "big") + payload

    def send(self, packets: list[bytes]) -> None:
        """Send ``packets`` in one write, with a PINGREQ when one is due (a publisher whose nodes are not active yet sends nothing else)."""
        now = time.monotonic()
        if now >= self._next_ping:
            packets = [*packets, PINGREQ]
            self._next_ping = now + PING_S
        if packets:
            self.sock.sendall(b"".join(packets))

    def ping(self) -> None:
        self.sock.sendall(PINGREQ)

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(10)
        self.sock.close()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            i, n = 0, len(buf)
            while i + 2 <= n:  # the broker sends PUBACK (4 bytes) and PINGRESP (2 bytes) here
                size = 2 + buf[i + 1]
                if i + size > n:
                    break
                if buf[i] == 0x40:
                    self.acked += 1
                i += size
            buf = buf[i:]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError("the broker closed the load generator's connection")
        data += chunk
    return data


def warm_up(port: int, nodes: int) -> None:
    """Publish seq 1 of nodes ``0 .. nodes-1`` as fast as the broker takes them: the fleet's first sight, before the ramp."""
    import paho.mqtt.client as paho

    from edge_agent.protocol import Heartbeat, NodeFacts, Topics, encode

    facts = NodeFacts(arch="arm64", cpu_count=4, cpu_load_1m=0.4, mem_total_bytes=4 << 30, mem_available_bytes=3 << 30,
                      disk_total_bytes=32 << 30, disk_free_bytes=20 << 30)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"scale-warmup-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages_set(2000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    last = None
    for i in range(nodes):
        shop, node = node_ids(i)
        hb = Heartbeat(shop=shop, node=node, epoch=EPOCH, seq=1, interval_s=INTERVAL_S, facts=facts)
        last = c.publish(Topics.node(shop, node, "telemetry"), encode(hb), qos=1)
        if i % 2000 == 1999:
            last.wait_for_publish(120)
    if last is not None:
        last.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


# ----- the controller (child process) ----------------------------------------------------------------


def controller(db_url: str, port: int, client_id: str, group: str | None, conn: multiprocessing.connection.Connection,
               stop: Any, partitions: int = 0, retention_interval_s: float = 60.0, sweep_max_changes: int | None = None,
               sweep_interval_s: float | None = None) -> None:
    """Run one controller replica until ``stop`` (an Event) is set.

    Sends ``(t, stored, pending, [latencies], subscribed shops, cursor conflicts)`` once a second.
    """
    logging.basicConfig(level=logging.WARNING)
    from fleet_controller.service import ControllerService
    from fleet_controller.settings import load_settings

    broker: dict[str, Any] = {"port": port, "client_id": client_id}
    if group:
        broker.update(protocol="5", shared_group=group)
    # Retention (and the series roll-up) runs in the writer between batches, every
    # retention.interval_s: the deployed default unless --retention-interval-s says otherwise.
    over: dict[str, Any] = {"db_url": db_url, "broker": broker, "api": {"port": 0}, "instance": client_id,
                            "retention": {"interval_s": retention_interval_s}}
    if partitions:
        over["intake"] = {"partitions": partitions}
    if sweep_max_changes:
        over.setdefault("presence", {})["sweep_max_changes"] = sweep_max_changes
    if sweep_interval_s:
        over.setdefault("presence", {})["sweep_interval_s"] = sweep_interval_s
    settings = load_settings(None, over, environ={})

    async def run() -> None:
        svc = ControllerService(settings, migrate=False)
        seen: list[float] = []
        hist = svc.metrics.ingest_latency
        observe = hist.observe

        def record(value: float, *a: Any, **kw: Any) -> None:  # every receive-to-commit latency, not just its bucket
            seen.append(value)
            observe(value, *a, **kw)

        hist.observe = record  # type: ignore[method-assign]
        await svc.start()
        conn.send(("ready", os.getpid()))
        try:
            while not stop.is_set():
                # Five reports a second: the parent pairs each with the publishers' count of the same moment, so the
                # backlog it computes is off by at most 0.2 s of stored messages (once a second left it up to 1 s).
                await asyncio.sleep(0.2)
                batch, seen[:] = list(seen), []
                shops = svc.partitions.status().shops if svc.partitions is not None else -1
                conflicts = svc.metrics.cursor_conflicts._value.get()
                conn.send((time.time(), svc.intake.stored_total, len(svc.intake._pending), batch, shops, conflicts))
        finally:
            await svc.stop()
            conn.send(("stopped", svc.intake.stored_total))

    asyncio.run(run())


# ----- the parent: ramp, sample, report ----------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def cpu_of(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds so far of each group of processes (processes that ended count as 0 from then on)."""
    out = {}
    for name, ps in procs.items():
        total = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[name] = total
    return out


def postgres_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.info["name"] in ("postgres", "postmaster") or (p.info["cmdline"] and "postgres" in p.info["cmdline"][0]):
                out.append(p)
        except psutil.Error:
            pass
    return out


def register_shops(db_url: str, nodes: int) -> int:
    """Create the shops of nodes ``0 .. nodes-1`` (a running fleet's registry knows its shops); return how many."""
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.store import SHOPS

    shops = sorted({node_ids(i)[0] for i in range(nodes)})
    engine = create_engine(db_url)
    now = time.time()
    with engine.begin() as c:
        for k in range(0, len(shops), 5000):
            c.execute(SHOPS.insert(), [{"id": s, "name": s, "region": "", "labels": {}, "timezone": "UTC", "created_at": now}
                                       for s in shops[k:k + 5000]])
    engine.dispose()
    return len(shops)


def broker_delivery(broker: str, nodes: int, interval_s: float, location: Path) -> list[str] | None:
    """The broker's persistence, queue and in-flight lines: those ``shopfleet broker-config`` writes for this fleet
    (``broker="deployed"``: ``--rate-per-node`` 1/``interval_s``, the default outage and window), or the test harness's
    (``"harness"``: None). bench/ingest.py uses it too.

    The window matters: the controller acknowledges a batch after it commits, and the harness's 100 messages in flight cap
    its batches (the intake's ``batch_max_messages`` is 500) where the deployed 1,000 do not.
    """
    if broker == "harness":
        return None
    if broker != "deployed":
        raise ValueError(f"broker {broker!r}: use 'deployed' or 'harness'")
    from fleet_controller.broker_config import BrokerOptions, QueueSizing, persistence_lines

    return persistence_lines(QueueSizing(nodes=nodes, rate_per_node=1.0 / interval_s), BrokerOptions(), location, "the controller")


def run_ramp(args: argparse.Namespace, replicas: int, db_url: str, partitions: int = 0) -> dict[str, Any]:
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.migrations import upgrade
    from shopfleet.broker import BrokerProcess

    steps = [int(s) for s in args.steps.split(",")]
    upgrade(create_engine(db_url))
    n_shops = register_shops(db_url, max(steps)) if partitions else 0
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    (work / "broker").mkdir()
    broker = BrokerProcess(workdir=work / "broker", delivery=broker_delivery(args.broker, max(steps), args.interval, work / "broker")).start()
    ctx = multiprocessing.get_context("spawn")
    group = "scale" if replicas > 1 or partitions else None
    stop = ctx.Event()
    pipes, ctl_procs = [], []
    stored = [0] * replicas
    pending = [0] * replicas
    shops = [0] * replicas
    conflicts = [0.0] * replicas
    lat: list[tuple[float, float]] = []  # (t, latency)

    def poll() -> None:
        for r, conn in enumerate(pipes):
            while conn.poll(0.05):
                msg = conn.recv()
                if isinstance(msg[0], float):
                    t, stored[r], pending[r], got, shops[r], conflicts[r] = msg
                    lat.extend((t, v) for v in got)

    try:
        for r in range(replicas):
            parent_end, child_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=controller, args=(db_url, broker.port, f"scale-controller-{r}", group, child_end, stop, partitions,
                                                             args.retention_interval_s, args.sweep_max_changes, args.sweep_interval_s))
            p.start()
            pipes.append(parent_end)
            ctl_procs.append(p)
        pids = []
        for conn in pipes:
            if not conn.poll(args.warmup_timeout):
                raise RuntimeError(f"a controller did not start within {args.warmup_timeout:.0f} s")
            pids.append(conn.recv()[1])
        if partitions:  # every shop subscribed by its owner before the first heartbeat
            t_sub = time.time()
            while sum(shops) != n_shops or min(shops) <= 0:
                poll()
                if time.time() - t_sub > args.warmup_timeout:
                    raise RuntimeError(f"replicas subscribed {shops} of {n_shops} shops within {args.warmup_timeout:.0f} s")
            print(f"  partitions: {n_shops} shops subscribed ({shops} per replica) in {time.time() - t_sub:.1f} s", file=sys.stderr, flush=True)
        # First sight of the whole fleet (creating its shops and nodes) happens once in a fleet's life: not measured.
        top = max(steps)
        t_warm = time.time()
        warm = ctx.Process(target=warm_up, args=(broker.port, top), daemon=True)
        warm.start()
        while sum(stored) < top and time.time() - t_warm < args.warmup_timeout:
            poll()
        warm.join(10)
        print(f"  warm-up: first sight of {sum(stored)}/{top} nodes in {time.time() - t_warm:.0f} s", file=sys.stderr, flush=True)
        lat.clear()
        t_start = time.time() + 1.0
        stop_at = t_start + len(steps) * args.step_s
        schedule = [(t_start + k * args.step_s, n) for k, n in enumerate(steps)]
        counters = [ctx.Value("q", 0) for _ in range(args.publishers)]
        pubs = [ctx.Process(target=publisher, args=(k, args.publishers, broker.port, schedule, args.interval, stop_at, counters[k], args.load), daemon=True)
                for k in range(args.publishers)]
        for p in pubs:
            p.start()
        ctl_ps = [psutil.Process(pid) for pid in pids]
        procs = {
            "controller": ctl_ps,
            "writer": [c for p in ctl_ps for c in p.children(recursive=True)],
            "mosquitto": [psutil.Process(broker.proc.pid)] if getattr(broker, "proc", None) else [],
            "publishers": [psutil.Process(p.pid) for p in pubs],
        }
        if db_url.startswith("postgresql"):
            procs["postgres"] = postgres_processes()
        samples: list[tuple[float, int, int, int]] = []  # t, published, stored, pending
        base = sum(stored)  # the warm-up's messages
        base_each, conflicts_base = list(stored), list(conflicts)
        cpu_marks: list[tuple[float, dict[str, float]]] = []
        next_cpu = time.time()
        while time.time() < stop_at:
            poll()
            now = time.time()
            samples.append((now, sum(c.value for c in counters), sum(stored) - base, sum(pending)))
            if now >= next_cpu:
                cpu_marks.append((now, cpu_of(procs)))
                next_cpu = now + 1.0
        for p in pubs:
            p.join(10)
        stop.set()
        for conn in pipes:
            deadline = time.time() + 30
            while time.time() < deadline and conn.poll(deadline - time.time()):
                msg = conn.recv()
                if msg[0] == "stopped":
                    break
        for p in ctl_procs:
            p.join(10)
    finally:
        stop.set()
        for p in ctl_procs:
            p.join(15)
            if p.is_alive():
                p.kill()
        broker.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return {"steps": report_steps(args, steps, schedule, samples, lat, cpu_marks), "replicas": replicas, "partitions": partitions,
            "stored_per_replica": [s - b for s, b in zip(stored, base_each, strict=True)],
            "cursor_conflicts_per_replica": [int(c - b) for c, b in zip(conflicts, conflicts_base, strict=True)]}


def report_steps(args: argparse.Namespace, steps: list[int], schedule: list[tuple[float, int]], samples: list[tuple[float, int, int, int]],
                 lat: list[tuple[float, float]], cpu_marks: list[tuple[float, dict[str, float]]]) -> list[dict[str, Any]]:
    out = []
    for start, nodes in schedule:
        lo, hi = start + min(args.interval, args.step_s / 2), start + args.step_s
        window = [s for s in samples if lo <= s[0] <= hi]
        if len(window) < 2:
            continue
        (t0, pub0, st0, _), (t1, pub1, st1, pend1) = window[0], window[-1]
        values = [v for t, v in lat if lo <= t <= hi]
        backlog0, backlog1 = pub0 - st0, pub1 - st1
        offered = (pub1 - pub0) / (t1 - t0)
        stored_rate = (st1 - st0) / (t1 - t0)
        cpus = [c for c in cpu_marks if lo <= c[0] <= hi]
        cpu = {}
        if len(cpus) >= 2:
            (ca, a), (cb, b) = cpus[0], cpus[-1]
            cpu = {name: round((b[name] - a[name]) / (cb - ca), 2) for name in b}
        p99 = percentile(values, 0.99)
        growth = backlog1 - backlog0
        lag = (p99 is not None and p99 >= 1.0) or growth > max(offered, 1.0)
        out.append({
            "nodes": nodes, "offered_msgs_per_s": round(offered, 1), "stored_msgs_per_s": round(stored_rate, 1),
            "p50_s": round(percentile(values, 0.5) or 0, 4), "p99_s": round(p99 or 0, 4), "latencies": len(values),
            "backlog_start": backlog0, "backlog_end": backlog1, "intake_pending_end": pend1, "lag": lag,
            "cpu_cores": cpu,
        })
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite", help="registry database (default: %(default)s)")
    p.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                   help="PostgreSQL database for --db postgresql; the run uses fresh schemas in it (default: %(default)s)")
    p.add_argument("--steps", default="10000,20000,40000,60000,80000,100000", help="nodes per step (default: %(default)s)")
    p.add_argument("--step-s", type=float, default=30.0, help="seconds per step (default: %(default)s)")
    p.add_argument("--interval", type=float, default=INTERVAL_S, help="heartbeat interval of every node (default: %(default)s)")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes (default: %(default)s)")
    p.add_argument("--load", choices=["raw", "paho"], default="raw",
                   help="load generator: raw, QoS 1 PUBLISH packets pipelined on a bare socket, a few µs a message; paho, a "
                        "paho client per publisher, tens of µs a message (the generator of runs before 2026-11-30 19:00, "
                        "which took 1.3 of 2 cores at 100,000 nodes) (default: %(default)s)")
    p.add_argument("--broker", choices=["deployed", "harness"], default="deployed",
                   help="the broker's persistence, queue and in-flight lines: deployed, as 'shopfleet broker-config' writes them for "
                        "this fleet (1,000 messages in flight); harness, the test harness's (100 in flight; every run before "
                        "2026-11-30 22:00) (default: %(default)s)")
    p.add_argument("--warmup-timeout", type=float, default=300, help="longest wait for the fleet's first sight (default: %(default)s)")
    p.add_argument("--replicas", default="1",
                   help="controller replica counts to run, comma-separated, e.g. 1,2; suffix rr: round-robin shared subscription "
                   "instead of partitions (2rr), p: partitions for one replica too (1p) (default: %(default)s)")
    p.add_argument("--retention-interval-s", type=float, default=60.0,
                   help="retention.interval_s of the controller: retention and the series roll-up run in the writer this often "
                        "(default: %(default)s, the deployed default; runs before 2026-11-30 03:30 used 3600, leaving them out)")
    p.add_argument("--sweep-max-changes", type=int, default=None,
                   help="presence.sweep_max_changes of the controller (default: the deployed default); the ramp's warm-up "
                        "sees every node of the largest step, so the nodes a step leaves out go silent together")
    p.add_argument("--sweep-interval-s", type=float, default=None,
                   help="presence.sweep_interval_s of the controller (default: the deployed default, 1 s); each sweep reads "
                        "every online node's row, tens of ms at 100,000 nodes, in the writer")
    p.add_argument("--partitions", type=int, default=16, help="intake.partitions of multi-replica runs (default: %(default)s)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # stop the broker and drop the schema on the way out
    import sqlalchemy as sa

    runs = []
    for token in args.replicas.split(","):
        replicas = int(token.rstrip("rp"))
        partitions = 0 if token.endswith("rr") or (replicas == 1 and not token.endswith("p")) else args.partitions
        schema = None
        db_dir: str | None = None
        if args.db == "sqlite":
            db_dir = tempfile.mkdtemp(prefix="bench-scale-db-")
            db_url = f"sqlite:///{db_dir}/controller.db"
        else:
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            eng = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            with eng.connect() as c:
                c.execute(sa.text(f'create schema "{schema}"'))
            sep = "&" if "?" in args.pg_url else "?"
            db_url = f"{args.pg_url}{sep}options=-csearch_path%3D{schema}"
        try:
            how = f"{partitions} partitions" if partitions else ("round-robin shared subscription" if replicas > 1 else "no partitions")
            print(f"--- {replicas} replica(s), {how}, on {args.db}: steps {args.steps} nodes, {args.step_s:.0f} s each", file=sys.stderr, flush=True)
            run = run_ramp(args, replicas, db_url, partitions)
        finally:
            if schema:
                with eng.connect() as c:
                    c.execute(sa.text(f'drop schema if exists "{schema}" cascade'))
                eng.dispose()
            if db_dir:  # a ramp leaves a database of a gigabyte or more
                shutil.rmtree(db_dir, ignore_errors=True)
        lag_at = next((s["nodes"] for s in run["steps"] if s["lag"]), None)
        run["lag_starts_at_nodes"] = lag_at
        runs.append(run)
        print(f"{replicas} replica(s), {how}, {args.db}: stored per replica {run['stored_per_replica']}, "
              f"cursor conflicts {run['cursor_conflicts_per_replica']}")
        print(f"  {'nodes':>7} {'offered/s':>9} {'stored/s':>9} {'p50 s':>7} {'p99 s':>7} {'backlog':>15}  cpu cores (controller / writer / mosquitto / publishers"
              f"{' / postgres' if args.db == 'postgresql' else ''})")
        for s in run["steps"]:
            c = s["cpu_cores"]
            print(f"  {s['nodes']:>7} {s['offered_msgs_per_s']:>9.0f} {s['stored_msgs_per_s']:>9.0f} {s['p50_s']:>7.3f} {s['p99_s']:>7.3f} "
                  f"{s['backlog_start']:>7}->{s['backlog_end']:<7}  {' / '.join(f'{v:.2f}' for v in c.values())}{'  LAG' if s['lag'] else ''}")
        print(f"  lag starts at: {lag_at if lag_at else 'no step lagged'}" + (" nodes" if lag_at else ""))
    print(json.dumps({"db": args.db, "broker": args.broker, "interval_s": args.interval, "step_s": args.step_s, "machine": f"{os.cpu_count()} cores {platform.machine()}",
                      "load_avg_1m": round(os.getloadavg()[0], 2), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

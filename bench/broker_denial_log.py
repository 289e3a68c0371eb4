"""Benchmark: what ``log_type debug`` (needed to see refused publishes) costs Mosquitto.

Two brokers are started from the files ``shopfleet broker-config`` writes, alike but for
``--denial-log``: the reference logs at Mosquitto's default levels, the other writes the debug log
that ``shopfleet broker-denials`` reads (to a file, as in production). The same load goes through
each, one after the other, alternating for ``--rounds``: ``--clients`` node users publish QoS 1
messages of ``--bytes`` bytes to their own topics, ``--denied-every``-th one to another shop's
topic (refused, logged), while a controller user subscribed to ``fleet/v1/#`` receives them.

Figures per broker: the broker process's CPU time (utime + stime from /proc, which the machine's
load moves less than wall time) per accepted message, and messages per second. ``ratio`` is the
debug broker's CPU per message over the reference's, measured in the same run; the log bytes
written per message say how fast the log grows. Last line: a JSON summary.

Usage: .venv/bin/python bench/broker_denial_log.py [--messages N] [--clients K] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet_controller.broker_config import BrokerOptions, write_broker_config
from shopfleet.broker import free_port, wait_for_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return utime + stime of ``pid`` in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def owner() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        pwd.getpwnam("mosquitto")
        return "mosquitto"
    except KeyError:
        return None


class Broker:
    def __init__(self, root: Path, name: str, nodes: list[tuple[str, str]], debug: bool) -> None:
        self.port = free_port()
        self.log = root / f"{name}.log" if debug else None
        opts = BrokerOptions(port=self.port, persistence_dir=root / f"{name}-data", owner=owner(),
                             denial_log=str(self.log) if self.log else None, controller_users=(f"bench-ctl-{name}",))
        self.files = write_broker_config(nodes, root / name, options=opts)
        self.creds = json.loads(self.files.credentials_file.read_text())
        self.out = open(root / f"{name}.stdout", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.files.conf_file)], stdout=self.out, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, 15, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.out.close()


def client(port: int, user: str, password: str, cid: str) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cid)
    c.username_pw_set(user, password)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def run_load(b: Broker, nodes: list[tuple[str, str]], messages: int, size: int, denied_every: int) -> tuple[float, float, int, int]:
    """Return (broker CPU s, wall s, accepted messages received, log bytes written)."""
    got = 0
    done = threading.Event()
    accepted_total = sum(1 for i in range(messages) if not (denied_every and i % denied_every == denied_every - 1))
    lock = threading.Lock()

    def on_message(c, u, m) -> None:
        nonlocal got
        with lock:
            got += 1
            if got >= accepted_total:
                done.set()

    ctl = b.creds["controller"]
    sub = client(b.port, ctl["username"], ctl["password"], "bench-ctl")
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.subscribe("fleet/v1/#", qos=1)
    subscribed.wait(10)
    pubs = []
    for shop, node in nodes:
        c = b.creds["nodes"][f"{shop}/{node}"]
        pubs.append((client(b.port, c["username"], c["password"], f"bench-{shop}-{node}"), shop, node))
    time.sleep(0.5)
    log0 = b.log.stat().st_size if b.log else 0
    payload = b"x" * size
    cpu0, t0 = cpu_seconds(b.proc.pid), time.perf_counter()
    infos = []
    for i in range(messages):
        c, shop, node = pubs[i % len(pubs)]
        denied = denied_every and i % denied_every == denied_every - 1
        topic = f"fleet/v1/other-shop/{node}/telemetry" if denied else f"fleet/v1/{shop}/{node}/telemetry"
        infos.append(c.publish(topic, payload, qos=1))
        if len(infos) >= 500:
            for info in infos:
                info.wait_for_publish(30)
            infos.clear()
    for info in infos:
        info.wait_for_publish(30)
    done.wait(60)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(b.proc.pid) - cpu0
    log_bytes = (b.log.stat().st_size - log0) if b.log else 0
    for c, _, _ in pubs:
        c.disconnect()
        c.loop_stop()
    sub.disconnect()
    sub.loop_stop()
    return cpu, wall, got, log_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--bytes", type=int, default=300, help="payload size (a heartbeat is a few hundred bytes)")
    ap.add_argument("--denied-every", type=int, default=100, help="every Nth publish goes to a refused topic (0: none)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    nodes = [("shop-a", f"pi-{i}") for i in range(args.clients)]
    root = Path(tempfile.mkdtemp(prefix="bench-denial-log-", dir="/tmp"))
    root.chmod(0o755)
    results: dict[str, list[tuple[float, float, int, int]]] = {"reference": [], "debug": []}
    try:
        brokers = {"reference": Broker(root, "reference", nodes, False), "debug": Broker(root, "debug", nodes, True)}
        try:
            for r in range(args.rounds):
                for name in (("reference", "debug") if r % 2 == 0 else ("debug", "reference")):
                    results[name].append(run_load(brokers[name], nodes, args.messages, args.bytes, args.denied_every))
        finally:
            for b in brokers.values():
                b.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def summary(name: str) -> dict[str, float]:
        rows = results[name]
        cpu = sum(r[0] for r in rows)
        wall = sum(r[1] for r in rows)
        got = sum(r[2] for r in rows)
        return {"cpu_us_per_msg": cpu / got * 1e6, "msgs_per_s": got / wall, "log_bytes_per_msg": sum(r[3] for r in rows) / got, "received": got}

    ref, dbg = summary("reference"), summary("debug")
    load = os.getloadavg()
    for name, s in (("reference (default logging)", ref), ("debug log (--denial-log)", dbg)):
        print(f"{name:30} {s['cpu_us_per_msg']:7.1f} us broker CPU/msg  {s['msgs_per_s']:8.0f} msg/s  "
              f"{s['log_bytes_per_msg']:6.0f} log bytes/msg  ({s['received']} received)")
    ratio = dbg["cpu_us_per_msg"] / ref["cpu_us_per_msg"]
    print(f"debug / reference broker CPU per message: {ratio:.2f}; load average {load[0]:.2f}")
    print(json.dumps({
        "ratio": round(ratio, 3),
        "reference_cpu_us_per_msg": round(ref["cpu_us_per_msg"], 2),
        "debug_cpu_us_per_msg": round(dbg["cpu_us_per_msg"], 2),
        "reference_msgs_per_s": round(ref["msgs_per_s"]),
        "debug_msgs_per_s": round(dbg["msgs_per_s"]),
        "debug_log_bytes_per_msg": round(dbg["log_bytes_per_msg"], 1),
        "messages": args.messages, "rounds": args.rounds, "clients": args.clients, "payload_bytes": args.bytes,
        "denied_every": args.denied_every, "load_average_1m": round(load[0], 2),
        "machine": f"{os.cpu_count()} cores {os.uname().machine}",
    }))  # fmt: skip


if __name__ == "__main__":
    main()

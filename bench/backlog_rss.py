"""Controller memory while draining a large backlog: flow control must keep RSS flat (issue 15).

A ``shopfleet controller`` process (SQLite, the default ``intake.max_queue``) connects once to a
real Mosquitto to create its persistent session and is measured idle, then stopped; ``--messages``
heartbeats of ``--nodes`` simulated nodes are queued for its session while it is away; it is
started again and its RSS (and its registry writer child's) is sampled every 0.1 s until every
message is stored. Issue 15 saw the controller's RSS go 109 -> 245 MiB draining 115k messages,
the intake deque holding 92,410 of them.

Prints RSS idle, at the start of the drain, peak and end, the peak's ratio against idle (the
reference, measured in the same run), the intake queue's peak and whether reading was paused,
and the drain rate with the load average; last line: a JSON summary.

    .venv/bin/python bench/backlog_rss.py [--messages 100000] [--nodes 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

import paho.mqtt.client as paho
import psutil

from edge_agent.protocol import Heartbeat, NodeFacts, Topics, encode
from shopfleet.broker import BrokerProcess

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
FACTS = NodeFacts(hostname="pi", arch="arm64", os="Debian 12", kernel="6.6", node_class="pi", cpu_count=4, cpu_load_1m=0.4,
                  mem_total_bytes=4 << 30, mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30,
                  cpu_temp_c=51.2, onnx_providers=("CPUExecutionProvider",), agent_version="0.1.0")


class Controller:
    def __init__(self, workdir: Path, port: int) -> None:
        self.workdir, self.port = workdir, port
        self.log = workdir / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        size = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "shopfleet", "controller", "--data-dir", str(self.workdir / "data"),
               "--broker", f"127.0.0.1:{self.port}", "--client-id", "bench-backlog", "--api", "127.0.0.1:0"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"controller exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            m = re.search(r": API (http://\S+)", self.log.read_text(errors="replace")[size:])
            if m:
                self.url = m.group(1)
                return
            time.sleep(0.1)
        raise SystemExit(f"controller did not start: {self.log.read_text()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("shopfleet_controller_"):
                name = line.split("{", 1)[0].split(" ", 1)[0]
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def rss(self) -> tuple[int, int]:
        """(controller RSS, controller + children RSS) in bytes."""
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        own = p.memory_info().rss
        kids = 0
        for c in p.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                kids += c.memory_info().rss
        return own, own + kids

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


def publish_backlog(port: int, nodes: int, messages: int) -> None:
    """Publish ``messages`` heartbeats round-robin over ``nodes`` nodes (QoS 1, broker-acknowledged)."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-backlog-publisher")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = []
    for k in range(messages):
        i, seq = k % nodes, k // nodes + 1
        shop, node = f"shop-{i // 4:04d}", f"node-{i % 4}"
        hb = Heartbeat(shop=shop, node=node, seq=seq, epoch="bench", interval_s=10.0, facts=FACTS)
        infos.append(c.publish(Topics.node(shop, node, "telemetry"), encode(hb), qos=1))
        if len(infos) >= 5000:
            for info in infos:
                info.wait_for_publish(60)
            infos.clear()
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--nodes", type=int, default=1000)
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="shopfleet-backlog-"))
    broker = BrokerProcess(workdir=workdir / "broker", extra_config=f"max_queued_messages {args.messages * 2}")
    (workdir / "broker").mkdir()
    broker.start()
    ctl = Controller(workdir, broker.port)
    try:
        ctl.start()
        time.sleep(3)  # idle: the reference, once imports and the writer settled
        idle_own, idle_total = ctl.rss()
        ctl.stop()
        t = time.monotonic()
        publish_backlog(broker.port, args.nodes, args.messages)
        print(f"queued {args.messages} heartbeats of {args.nodes} nodes in {time.monotonic() - t:.1f}s")

        samples: list[tuple[int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                with contextlib.suppress(psutil.NoSuchProcess, AssertionError):
                    samples.append(ctl.rss())
                time.sleep(0.1)

        cpu0 = time.monotonic()
        ctl.start()
        threading.Thread(target=sample, daemon=True).start()
        start_own, _start_total = ctl.rss()
        queue_peak = paused = 0.0
        drained_at = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            m = ctl.metrics()
            queue_peak = max(queue_peak, m.get("shopfleet_controller_intake_queue_messages", 0.0))
            paused = max(paused, m.get("shopfleet_controller_intake_paused", 0.0))
            if m.get("shopfleet_controller_ingested_total", 0.0) >= args.messages:
                drained_at = time.monotonic()
                break
            time.sleep(0.25)
        if drained_at is None:
            raise SystemExit(f"backlog not drained within 900 s: {ctl.metrics()}")
        drain_s = drained_at - cpu0
        time.sleep(1)
        stop.set()
        end_own, end_total = ctl.rss()
        peak_own = max(s[0] for s in samples)
        peak_total = max(s[1] for s in samples)
        load = os.getloadavg()
        print(f"controller RSS: idle {idle_own / MIB:.0f} MiB, drain start {start_own / MIB:.0f}, peak {peak_own / MIB:.0f}, "
              f"end {end_own / MIB:.0f} MiB; peak/idle {peak_own / idle_own:.2f}")
        print(f"controller + writer RSS: idle {idle_total / MIB:.0f} MiB, peak {peak_total / MIB:.0f}, end {end_total / MIB:.0f} MiB; "
              f"peak/idle {peak_total / idle_total:.2f}")
        print(f"intake queue peak {queue_peak:.0f} messages, paused: {'yes' if paused else 'no'}; drained {args.messages} in "
              f"{drain_s:.1f}s (incl. start) = {args.messages / drain_s:.0f} msg/s; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        print(json.dumps({
            "bench": "backlog_rss", "messages": args.messages, "nodes": args.nodes,
            "rss_idle_mib": round(idle_own / MIB, 1), "rss_start_mib": round(start_own / MIB, 1),
            "rss_peak_mib": round(peak_own / MIB, 1), "rss_end_mib": round(end_own / MIB, 1),
            "ratio_peak_idle": round(peak_own / idle_own, 2),
            "tree_rss_idle_mib": round(idle_total / MIB, 1), "tree_rss_peak_mib": round(peak_total / MIB, 1),
            "tree_ratio_peak_idle": round(peak_total / idle_total, 2),
            "intake_queue_peak": int(queue_peak), "paused": bool(paused), "drain_s": round(drain_s, 1),
            "load_avg_1m": round(load[0], 1),
        }))
    finally:
        ctl.stop()
        broker.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

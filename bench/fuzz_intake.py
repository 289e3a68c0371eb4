"""Intake fuzzer: thousands of generated payloads at a running controller, while a good node keeps heartbeating.

A real Mosquitto (on a free port), a real controller (``ControllerService``: MQTT adapter, batching
intake, the registry writer in its child process, SQLite by default) and two kinds of publishers:

* the **fuzzer**: ``--payloads`` messages (default 10,000) from a seeded generator, on the topics
  the controller subscribes to, for ten fuzz nodes of shop ``fuzz``. About a quarter are valid
  messages of every kind (with replays, seq jumps, epoch flips and absurd sessions among them),
  the rest hostile: deep nesting, NaN and Infinity, huge strings and lists, wrong types, unknown
  fields, wrong versions, mismatched identities and kinds, random bytes, NUL characters;
* a **good node** (shop ``good``) publishing a heartbeat every ``--beat-interval-s`` throughout.

It reports that every payload the controller received was either stored or counted (ingested +
rejected + duplicates + quarantined equals what was sent), that the good node's heartbeats were
all stored, and their latency from publish to visible in the registry while the fuzz ran. The
process exits 1 if a count does not match. Last line: a one-line JSON summary.

    .venv/bin/python bench/fuzz_intake.py [--payloads 10000] [--rate 1000] [--seed 1] [--db-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho

from edge_agent.protocol import Heartbeat, NodeFacts, Topics, encode
from fleet_controller.registry.read import NotFound
from fleet_controller.service import ControllerService
from fleet_controller.settings import load_settings
from shopfleet.broker import BrokerProcess

FACTS = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.2, mem_total_bytes=4 << 30,
                  mem_available_bytes=3 << 30, disk_total_bytes=32 << 30, disk_free_bytes=20 << 30)
FUZZ_SHOP = "fuzz"
NODES = [f"fz-{i}" for i in range(10)]
CHANNEL = {"heartbeat": "telemetry", "telemetry": "telemetry", "event": "events", "alert": "events",
           "command_result": "replies", "presence": "presence"}


# ----- the generator ---------------------------------------------------------------------------


class Generator:
    """A seeded generator of (topic, payload) pairs: valid, edge-case and hostile messages."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.seq = {n: 0 for n in NODES}
        self.epoch = {n: "e0" for n in NODES}
        self.session = {n: 1 for n in NODES}
        self.kinds: Counter[str] = Counter()

    def _valid(self, node: str) -> dict[str, Any]:
        r = self.r
        self.seq[node] += 1
        base = {"v": 1, "ts": time.time(), "shop": FUZZ_SHOP, "node": node, "epoch": self.epoch[node], "seq": self.seq[node]}
        kind = r.choice(["heartbeat", "telemetry", "event", "alert", "command_result"])
        if kind == "heartbeat":
            return {**base, "kind": kind, "interval_s": 10.0, "facts": FACTS.model_dump(mode="json"),
                    "metrics": {"cart_review_rate": r.random()}, "pipelines": {}}
        if kind == "telemetry":
            return {**base, "kind": kind, "readings": [{"name": "temperature_c", "value": r.uniform(-5, 10), "source": f"fridge-{r.randint(1, 3)}"}]}
        if kind == "event":
            return {**base, "kind": kind, "type": r.choice(["door_opened", "shelf_change"]), "data": {"slot": r.randint(0, 99)}}
        if kind == "alert":
            return {**base, "kind": kind, "name": "fridge_warm", "state": r.choice(["firing", "resolved"])}
        return {**base, "kind": kind, "correlation_id": uuid.UUID(int=r.getrandbits(128)).hex, "ok": r.random() < 0.8}

    def one(self) -> tuple[str, bytes]:
        """Return one (topic, payload)."""
        r = self.r
        node = r.choice(NODES)
        msg = self._valid(node)
        topic = Topics.node(FUZZ_SHOP, node, CHANNEL[msg["kind"]])
        case = r.choices(
            ["valid", "replay", "seq_jump", "epoch_flip", "presence", "session_jump", "deep", "nan", "huge_string",
             "huge_list", "wrong_type", "extra_field", "missing_field", "version", "identity", "kind_topic",
             "random_bytes", "not_object", "nul", "big_int", "truncated", "ghost_report"],
            weights=[20, 4, 3, 2, 4, 2, 8, 6, 4, 4, 6, 5, 5, 3, 4, 4, 5, 3, 3, 3, 3, 2],
        )[0]
        self.kinds[case] += 1
        if case == "replay":
            msg["seq"] = r.randint(1, max(1, self.seq[node] - 1))
            self.seq[node] -= 1
        elif case == "seq_jump":
            msg["seq"] = self.seq[node] + r.choice([10**6, 10**9, 2**62])
            self.seq[node] -= 1
        elif case == "epoch_flip":
            if r.random() < 0.5:
                self.epoch[node] = f"e{r.randint(1, 5)}"
                self.seq[node] = 1
                msg["epoch"], msg["seq"] = self.epoch[node], 1
            else:
                msg["epoch"] = f"e{r.randint(0, 5)}"  # maybe an epoch the node has left
                self.seq[node] -= 1
        elif case in ("presence", "session_jump"):
            self.seq[node] -= 1
            if case == "presence":
                self.session[node] += 1
                session = self.session[node]
            else:
                session = self.session[node] + r.choice([10**5, 10**8, 2**31 - 1])
            msg = {"v": 1, "ts": time.time(), "kind": "presence", "shop": FUZZ_SHOP, "node": node,
                   "state": r.choice(["online", "offline"]), "session": session}
            topic = Topics.node(FUZZ_SHOP, node, "presence")
        elif case == "deep":
            msg["kind"], msg["type"] = "event", "deep"
            msg.pop("interval_s", None), msg.pop("facts", None), msg.pop("metrics", None), msg.pop("pipelines", None)
            msg.pop("readings", None), msg.pop("name", None), msg.pop("state", None), msg.pop("correlation_id", None), msg.pop("ok", None)
            levels = r.choice([9, 50, 300, 900, 5000])
            msg["data"] = {"x": "DEEP"}
            deep = '{"a": ' * levels + "0" + "}" * levels  # built as text: json.dumps itself gives up near 1,000 levels
            return Topics.node(FUZZ_SHOP, node, "events"), json.dumps(msg).replace('"DEEP"', deep).encode()
        elif case == "nan":
            literal = r.choice(["NaN", "Infinity", "-Infinity", "1e999"])
            return topic, json.dumps(msg).replace('"ts": ', f'"ts": {literal}, "_ts": ', 1).encode()
        elif case == "huge_string":
            msg["epoch"] = "x" * r.choice([65, 10_000, 200_000])
        elif case == "huge_list":
            msg["kind"] = "telemetry"
            msg["readings"] = [{"name": "w", "value": 1.0}] * r.choice([1001, 5000])
            topic = Topics.node(FUZZ_SHOP, node, "telemetry")
        elif case == "wrong_type":
            key = r.choice(["seq", "ts", "shop", "epoch", "kind"])
            msg[key] = r.choice([None, [], {}, "seven", True, -1])
        elif case == "extra_field":
            msg[r.choice(["surprise", "__class__", "kind2"])] = 1
        elif case == "missing_field":
            msg.pop(r.choice(["seq", "epoch", "kind", "shop"]))
        elif case == "version":
            msg["v"] = r.choice([0, 2, "1", None])
        elif case == "identity":
            msg["node"] = r.choice([n for n in NODES if n != node])
        elif case == "kind_topic":
            topic = Topics.node(FUZZ_SHOP, node, "replies" if msg["kind"] != "command_result" else "events")
        elif case == "random_bytes":
            return topic, r.randbytes(r.randint(0, 512))
        elif case == "not_object":
            return topic, json.dumps(r.choice([[1, 2], "text", 42, None])).encode()
        elif case == "nul":
            msg["kind"], msg["type"], msg["data"] = "event", "door\x00opened", {}
            for k in ("interval_s", "facts", "metrics", "pipelines", "readings", "name", "state", "correlation_id", "ok"):
                msg.pop(k, None)
            topic = Topics.node(FUZZ_SHOP, node, "events")
        elif case == "big_int":
            msg["seq"] = r.choice([2**63, 2**70, -5, 0])
            self.seq[node] -= 1
        elif case == "ghost_report":  # a reported state from a node that never announced itself: refused, never a node
            self.seq[node] -= 1
            ghost = f"ghost-{r.randint(0, 3)}"
            msg = {"v": 1, "ts": time.time(), "kind": "reported_state", "shop": FUZZ_SHOP, "node": ghost, "epoch": "g0",
                   "seq": r.randint(1, 10**6), "revision": r.randint(1, 50), "status": "applied", "release": "r1"}
            topic = Topics.reported(FUZZ_SHOP, ghost)
        elif case == "truncated":
            full = json.dumps(msg).encode()
            return topic, full[: r.randint(0, len(full) - 1)]
        return topic, json.dumps(msg).encode()


# ----- the controller in a thread -----------------------------------------------------------------


class Controller:
    """A ControllerService on its own event loop thread."""

    def __init__(self, port: int, db_url: str) -> None:
        settings = load_settings(None, {"db_url": db_url, "broker": {"port": port, "client_id": f"fuzz-ctl-{uuid.uuid4().hex[:6]}"},
                                        "api": {"port": 0}, "presence": {"sweep_interval_s": 1.0}}, environ={})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.svc = ControllerService(settings)
        asyncio.run_coroutine_threadsafe(self.svc.start(), self.loop).result(120)

    def metric_sum(self, name: str) -> dict[str, float]:
        """Return the samples of metric family ``name`` by their label values (one key for an unlabelled counter)."""
        out: dict[str, float] = {}
        for fam in self.svc.metrics_registry.collect():
            if fam.name == name:
                for s in fam.samples:
                    if s.name == name + "_total":
                        out[",".join(s.labels.values()) or "all"] = s.value
        return out

    def counted(self) -> dict[str, Any]:
        """Return every bucket a received message can end in."""
        return {
            "ingested": self.metric_sum("shopfleet_controller_ingested"),
            "rejected": {k: v for k, v in self.metric_sum("shopfleet_controller_rejected").items() if v},
            "duplicates": sum(self.metric_sum("shopfleet_controller_duplicates").values()),
            "quarantined": {k: v for k, v in self.metric_sum("shopfleet_controller_quarantined").items() if v},
        }

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.svc.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def total(counted: dict[str, Any]) -> int:
    return int(sum(counted["ingested"].values()) + sum(counted["rejected"].values()) + counted["duplicates"]
               + sum(counted["quarantined"].values()))


def client(port: int, name: str) -> paho.Client:
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--payloads", type=int, default=10_000, help="fuzz payloads to send (default 10,000)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the generator (the same seed sends the same payloads)")
    ap.add_argument("--rate", type=float, default=1000, help="fuzz payloads per second (default 1,000: 10 s of fuzz alongside the good node)")
    ap.add_argument("--beat-interval-s", type=float, default=0.05, help="seconds between the good node's heartbeats")
    ap.add_argument("--db-url", help="registry database (default: SQLite in a temporary directory)")
    ap.add_argument("--timeout-s", type=float, default=300, help="longest wait for the controller to count everything")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="fuzz-intake-"))
    (work / "broker").mkdir()
    broker = BrokerProcess(workdir=work / "broker").start()
    ctl = Controller(broker.port, args.db_url or f"sqlite:///{work / 'registry.db'}")
    gen = Generator(args.seed)
    sent_good: dict[int, float] = {}
    visible: dict[int, float] = {}
    stop = threading.Event()

    def good_node() -> None:
        c = client(broker.port, "good")
        seq = 0
        topic = Topics.node("good", "pi-1", "telemetry")
        while not stop.is_set():
            seq += 1
            payload = encode(Heartbeat(shop="good", node="pi-1", epoch="g", seq=seq, interval_s=10, facts=FACTS))
            sent_good[seq] = time.perf_counter()
            c.publish(topic, payload, qos=1).wait_for_publish(10)
            stop.wait(args.beat_interval_s)
        c.disconnect()
        c.loop_stop()

    def watcher() -> None:
        # Latency of the good node: publish -> its heartbeat visible in the registry (the watermark moved past it).
        while not stop.is_set() or len(visible) < len(sent_good):
            try:
                wm = ctl.svc.reader.get_node("good", "pi-1").watermark
            except NotFound:
                wm = 0
            now = time.perf_counter()
            for s in range(len(visible) + 1, wm + 1):
                visible[s] = now
            if stop.is_set() and time.perf_counter() > deadline:
                return
            time.sleep(0.01)

    deadline = math.inf
    threads = [threading.Thread(target=good_node, daemon=True), threading.Thread(target=watcher, daemon=True)]
    for t in threads:
        t.start()
    fuzz = client(broker.port, "fuzzer")
    t0 = time.perf_counter()
    infos = []
    for n in range(args.payloads):
        ahead = t0 + n / args.rate - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)
        topic, payload = gen.one()
        infos.append(fuzz.publish(topic, payload, qos=1))
        if len(infos) % 500 == 0:
            for i in infos[-500:]:
                i.wait_for_publish(30)
    for i in infos:
        i.wait_for_publish(30)
    fuzz_seconds = time.perf_counter() - t0
    stop.set()
    threads[0].join(30)
    deadline = time.perf_counter() + args.timeout_s
    expected = args.payloads + len(sent_good)
    while total(ctl.counted()) < expected and time.perf_counter() < deadline:
        time.sleep(0.05)
    threads[1].join(max(deadline - time.perf_counter(), 1))
    counted = ctl.counted()
    good = ctl.svc.reader.get_node("good", "pi-1")
    health = ctl.svc.health()
    ctl.stop()
    fuzz.disconnect()
    fuzz.loop_stop()
    broker.cleanup()

    lat = sorted((visible[s] - sent_good[s]) * 1000 for s in sent_good if s in visible)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    got = total(counted)
    stored_good = good.messages_total
    summary = {
        "payloads": args.payloads, "seed": args.seed, "good_heartbeats": len(sent_good), "received_expected": expected,
        "counted": got, "count_match": got == expected,
        "stored": int(sum(counted["ingested"].values())), "rejected": int(sum(counted["rejected"].values())),
        "duplicates": int(counted["duplicates"]), "quarantined": int(sum(counted["quarantined"].values())),
        "rejected_by_reason": {k: int(v) for k, v in sorted(counted["rejected"].items())},
        "good_stored": stored_good, "good_all_stored": stored_good == len(sent_good),
        "good_latency_ms_p50": round(q[49], 1), "good_latency_ms_p99": round(q[98], 1), "good_latency_ms_max": round(max(lat), 1) if lat else None,
        "fuzz_send_seconds": round(fuzz_seconds, 1), "health": health["status"],
        "cases": dict(sorted(gen.kinds.items())), "db": "postgresql" if args.db_url and "postgres" in args.db_url else "sqlite",
        "python": platform.python_version(),
    }
    print(f"fuzz: {args.payloads} payloads in {fuzz_seconds:.1f}s; counted {got}/{expected} "
          f"(stored {summary['stored']}, rejected {summary['rejected']}, duplicates {summary['duplicates']}, "
          f"quarantined {summary['quarantined']}); good node {stored_good}/{len(sent_good)} heartbeats stored, "
          f"latency p50 {summary['good_latency_ms_p50']} ms, p99 {summary['good_latency_ms_p99']} ms")
    print(json.dumps(summary))
    return 0 if summary["count_match"] and summary["good_all_stored"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of rollouts: planning 10,000 shops, and a simulated rollout over 1,000 shops.

1. ``plan_rollout`` for a fleet of 10,000 shops and a four-wave policy (median of 5 runs). The
   reference measured in the same run is the least work any stable spread order needs: hashing and
   sorting the 10,000 shop ids.
2. A real controller (child process: intake, registry on SQLite, rollout executor) rolls a release
   out to 1,000 simulated shops over a real Mosquitto (``shopfleet.sim.fleet``: signature
   checked, applied to the simulated cluster, reported, heartbeats). Figures: wall time from start
   to ``completed``, messages (desired states in, uplinks out), the controller process's peak RSS.
   The reference is the floor the policy itself imposes (one bake time per wave, plus one
   heartbeat interval per wave for fresh evidence).

Last line: a one-line JSON summary with ``plan_10000_shops_s``, ``rollout_1000_shops_s`` and
``peak_rss_mb``. Run: ``.venv/bin/python bench/rollout.py [--shops 1000] [--plan-shops 10000]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleet_controller.rollout.planner import FleetShop, plan_rollout  # noqa: E402
from fleet_controller.rollout.policy import policy_from_dict  # noqa: E402

POLICY = {"waves": [{"name": "canary", "percent": 0.5}, {"name": "ten", "percent": 10}, {"name": "half", "percent": 50}, {"name": "all", "percent": 100}]}


def bench_plan(n: int) -> tuple[float, float]:
    """Return (median plan seconds, median reference seconds) for ``n`` shops."""
    fleet = [FleetShop(id=f"shop-{i:05d}", region=("north", "south", "east")[i % 3], labels={"tier": "standard"},
                       node_classes=frozenset({"pi", "gpu"}), release="r1") for i in range(n)]
    policy = policy_from_dict(POLICY)
    plan_times, ref_times = [], []
    for _ in range(5):
        t = time.perf_counter()
        plan = plan_rollout(fleet, "r2", policy)
        plan_times.append(time.perf_counter() - t)
        assert len(plan.shops) == n
        t = time.perf_counter()
        sorted(fleet, key=lambda s: hashlib.sha256(f"r2\0{s.id}".encode()).digest())
        ref_times.append(time.perf_counter() - t)
    return statistics.median(plan_times), statistics.median(ref_times)


def controller_process(config: dict) -> None:
    """Run a controller with the rollout executor until SIGTERM (the child side of the rollout bench)."""
    import asyncio
    import signal

    from fleet_controller.rollout import install
    from fleet_controller.rollout.executor import ExecutorSettings
    from fleet_controller.service import ControllerService
    from fleet_controller.settings import load_settings

    async def main() -> None:
        service = ControllerService(load_settings(None, config["controller"], environ={}))
        install(service, ExecutorSettings.model_validate(config["executor"]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await service.start()
        print("READY", flush=True)
        await stop.wait()
        await service.stop()

    asyncio.run(main())


def bench_rollout(n: int, heartbeat_s: float, bake_s: float) -> dict:
    """Roll a release out to ``n`` simulated shops; return the figures."""
    import psutil
    from sqlalchemy import func, select

    from edge_agent.apply.verify import Verifier
    from fleet_controller.registry.db import create_engine
    from fleet_controller.registry.models import Shop
    from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
    from fleet_controller.rollout.signing import generate_keypair
    from fleet_controller.rollout.store import rollout_status, start_rollout
    from shopfleet.broker import BrokerProcess
    from shopfleet.sim.fleet import SimulatedFleet

    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    (tmp / "broker").mkdir()
    broker = BrokerProcess(workdir=tmp / "broker").start()
    generate_keypair(tmp / "k.pem")
    db_url = f"sqlite:///{tmp / 'controller.db'}"
    config = {
        "controller": {"db_url": db_url, "broker": {"port": broker.port}, "api": {"port": 0}, "instance": "bench",
                       "presence": {"default_interval_s": heartbeat_s}},
        "executor": {"signing_key": str(tmp / "k.pem"), "tick_interval_s": 0.5, "lease_ttl_s": 10},
    }
    ctl = subprocess.Popen([sys.executable, __file__, "--controller-process", json.dumps(config)], stdout=subprocess.PIPE,
                           stderr=open(tmp / "controller.log", "wb"), cwd=ROOT)  # noqa: SIM115 - held by the child
    assert ctl.stdout.readline().startswith(b"READY"), f"controller did not start; see {tmp / 'controller.log'}"
    proc = psutil.Process(ctl.pid)
    peak = [proc.memory_info().rss]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return

    threading.Thread(target=sample, daemon=True).start()
    shops = [f"shop-{i:04d}" for i in range(n)]
    fleet = SimulatedFleet(shops, Verifier.from_files([tmp / "k.pub"]), tmp / "agents", host="127.0.0.1", port=broker.port,
                           connections=4, heartbeat_interval_s=heartbeat_s)
    engine = create_engine(db_url)
    try:
        fleet.start()
        print(f"waiting for {n} shops to reach the registry ...", file=sys.stderr)
        deadline = time.monotonic() + 120
        while True:
            with engine.connect() as c:
                known = c.execute(select(func.count()).select_from(Shop)).scalar()
            if known >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {known} of {n} shops registered")
            time.sleep(0.5)
        ReleaseStore(engine).create(ReleaseSpec(name="r1", version="1", images={"vision": "reg.example/vision@sha256:" + "ab" * 32}))
        policy = policy_from_dict({**POLICY, "max_in_flight": 500, "bake_time_s": bake_s, "apply_timeout_s": 120,
                                   "gates": {"min_fps": 5}})
        in_before = fleet.messages_in
        out_before = sum(s._seq for s in fleet.shops.values())
        t0 = time.perf_counter()
        rid = start_rollout(engine, "r1", policy)["id"]
        last = ""
        while True:
            st = rollout_status(engine, rid)
            line = " | ".join(f"{w['name']} {w['done']}/{w['shops']}" for w in st["waves"])
            if line != last:
                print(f"  {time.perf_counter() - t0:6.1f}s {st['status']}: {line}", file=sys.stderr)
                last = line
            if st["status"] not in ("running", "paused", "rolling_back"):
                break
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("rollout did not finish in 600 s")
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        if st["status"] != "completed":
            raise RuntimeError(f"rollout ended {st['status']}: {st['reason']}")
        return {
            "seconds": elapsed,
            "desired_in": fleet.messages_in - in_before,
            "uplinks_out": sum(s._seq for s in fleet.shops.values()) - out_before,
            "peak_rss_mb": peak[0] / 2**20,
            "floor_s": len(policy.waves) * (bake_s + heartbeat_s),
        }
    finally:
        sampling.set()
        fleet.stop()
        ctl.terminate()
        try:
            ctl.wait(20)
        except subprocess.TimeoutExpired:
            ctl.kill()
        engine.dispose()
        broker.cleanup()


def main() -> int:
    """Run both benchmarks and print the figures and the JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-shops", type=int, default=10_000, help="fleet size for the planning benchmark (default: %(default)s)")
    ap.add_argument("--shops", type=int, default=1000, help="simulated shops in the rollout benchmark (default: %(default)s)")
    ap.add_argument("--heartbeat", type=float, default=3.0, help="simulated heartbeat interval, seconds (default: %(default)s)")
    ap.add_argument("--bake", type=float, default=2.0, help="bake time per shop, seconds (default: %(default)s)")
    ap.add_argument("--controller-process", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.controller_process:
        controller_process(json.loads(args.controller_process))
        return 0
    plan_s, ref_s = bench_plan(args.plan_shops)
    print(f"plan {args.plan_shops} shops: {plan_s * 1000:.1f} ms; reference (hash+sort ids): {ref_s * 1000:.1f} ms; ratio {plan_s / ref_s:.2f}")
    r = bench_rollout(args.shops, args.heartbeat, args.bake)
    print(f"rollout {args.shops} shops: {r['seconds']:.1f} s; reference (policy floor: waves x (bake + heartbeat)): {r['floor_s']:.1f} s; "
          f"ratio {r['seconds'] / r['floor_s']:.2f}")
    print(f"messages: {r['desired_in']} desired states in, {r['uplinks_out']} uplinks out; controller peak RSS {r['peak_rss_mb']:.0f} MB")
    print(json.dumps({
        "plan_10000_shops_s": round(plan_s, 4), "plan_reference_s": round(ref_s, 4),
        "rollout_1000_shops_s": round(r["seconds"], 2), "rollout_floor_s": r["floor_s"], "shops": args.shops,
        "desired_messages": r["desired_in"], "uplink_messages": r["uplinks_out"], "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "machine": f"{os.cpu_count()} cores {os.uname().machine}",
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

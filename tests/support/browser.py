"""What the browser tests share: Debian's Chromium and its flags, a controller with the dashboard on a thread, node facts."""

from __future__ import annotations

from edge_agent.protocol import NodeFacts
from fleet_controller.alerts import install as install_alerts
from fleet_controller.alerts.rules import parse_rules
from fleet_controller.rollout.api import build_router as rollout_router
from fleet_controller.rollout.policy import policy_from_dict
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
from fleet_controller.rollout.store import start_rollout
from fleet_controller.service import ControllerService
from fleet_controller.web.dashboard.setup import Dashboard, attach
from tests.support.controller import role_users
from tests.support.loop import LoopThread

CHROMIUM = "/usr/bin/chromium"


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


SHOPS = {"shop-a": "Harbour Street", "shop-b": "Station Square", "shop-c": "Airport Gate 4"}


class Controller(LoopThread[ControllerService]):
    """The service plus the dashboard parts, on a loop thread."""

    def __init__(self, settings) -> None:
        service = ControllerService(settings)
        rules = parse_rules("interval_s: 0.5\nresolve_after_s: 0\ndisk_low: {min_free_percent: 10}\nnode_offline: {after_s: 1}\n")
        self.dashboard: Dashboard = attach(service, rules)
        install_alerts(service, rules)
        service.add_router(rollout_router(service.engine))
        super().__init__(service)
        self.creds = role_users(self.dashboard.store)
        self.url = self.service.api_url

    def start_rollout(self) -> int:
        """Create a release and start its rollout (no executor runs here: it stays at the canary)."""
        ReleaseStore(self.service.engine).create(
            ReleaseSpec(name="2026.11-r2", version="2", images={"vision": "reg.example/vision@sha256:" + "5e" * 32}))
        policy = policy_from_dict({"waves": [{"name": "canary", "shops": ["shop-a"]}, {"name": "all", "percent": 100}]})
        return start_rollout(self.service.engine, "2026.11-r2", policy)["id"]


def facts(disk_free_gib: float, hostname: str) -> NodeFacts:
    return NodeFacts(hostname=hostname, arch="arm64", os="Debian 12", node_class="pi", cpu_count=4, cpu_load_1m=0.4,
                     mem_total_bytes=8 << 30, mem_available_bytes=5 << 30, disk_total_bytes=64 << 30,
                     disk_free_bytes=int(disk_free_gib * (1 << 30)), clock_offset_s=0.02, agent_version="0.1.0")


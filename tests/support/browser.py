"""What the browser tests share: Debian's Chromium and its flags, pages that record script errors, a logged-in
session, a controller with the dashboard on a thread, node facts."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, Page, expect, sync_playwright

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


SCREENSHOTS = (Path(__file__).resolve().parents[2] / "docs" / "img" if os.environ.get("SHOPFLEET_UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "shopfleet-screenshots")
"""Where the browser tests save screenshots: a temporary directory, or with SHOPFLEET_UPDATE_SCREENSHOTS=1
docs/img (the README shows the ones `make screenshots` takes of the demo)."""


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium through Playwright, headless with CHROMIUM_ARGS; closed on exit."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def watched_page(browser: Browser, base_url: str, **ctx) -> tuple[Page, list[str]]:
    """A new page on ``base_url`` (in a context given ``ctx``) and the list its uncaught exceptions and console errors go to."""
    page = browser.new_context(base_url=base_url, **ctx).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    return page, errors


class Session:
    """A page logged in to the dashboard at /fleet, recording console errors, uncaught exceptions and HTTP errors.

    A URL ending in one of ``expected_failures`` may fail without being recorded.
    """

    def __init__(self, browser: Browser, base: str, user: str, password: str, **ctx) -> None:
        self.context = browser.new_context(base_url=base, **ctx)
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.expected_failures: set[str] = set()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", lambda r: self.errors.append(f"{r.status} {r.url}") if r.status >= 400 and not self.expected(r) else None)
        self.page.goto("/fleet")
        expect(self.page).to_have_url(f"{base}/login?next=%2Ffleet")
        self.page.fill("input[name=username]", user)
        self.page.fill("input[name=password]", password)
        self.page.click("button[type=submit]")
        expect(self.page).to_have_url(f"{base}/fleet")

    def _console(self, m) -> None:
        if m.type == "error" and not ("Failed to load resource" in m.text and self._expected_url(m.location.get("url", ""))):
            self.errors.append(m.text)

    def _expected_url(self, url: str) -> bool:
        return any(url.endswith(p) for p in self.expected_failures)

    def expected(self, response) -> bool:
        return self._expected_url(response.url)

    def close(self) -> None:
        self.context.close()


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


"""The silences and history pages in Debian's Chromium against a running controller.

An operator silences a firing alert for a chosen time with a comment, sees it listed with its
author, and ends it early (undo); the history shows a resolved alert with its node, duration,
flap count and acknowledger, and filters by shop. The controller runs with the alert pages wired
exactly as ``build_service`` wires them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from fleet_controller.alerts import install as install_alerts
from fleet_controller.alerts import store
from fleet_controller.alerts.evaluator import Firing, alert_key
from fleet_controller.alerts.rules import parse_rules
from fleet_controller.service import ControllerService
from fleet_controller.web import alerts_pages
from fleet_controller.web.dashboard.setup import attach
from tests.support.browser import CHROMIUM, chromium, watched_page
from tests.support.controller import controller_settings, role_users
from tests.support.loop import LoopThread

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Nothing the evaluator sees fires, and nothing resolves within the test: the alerts below are
# put in the store directly, as the evaluator would.
RULES = "interval_s: 1\nresolve_after_s: 86400\n" + "".join(
    f"{r}: {{enabled: false}}\n" for r in ("node_offline", "camera_fps_low", "fridge_warm", "disk_low", "clock_skew", "node_alerts"))


class Controller(LoopThread[ControllerService]):
    """The service with the dashboard and the alert pages, on a loop thread."""

    def __init__(self, settings) -> None:
        service = ControllerService(settings)
        rules = parse_rules(RULES)
        dash = attach(service, rules)
        worker = install_alerts(service, rules)
        alerts_pages.attach(service, worker.metrics)
        super().__init__(service)
        self.creds = role_users(dash.store)
        self.url = self.service.api_url


@pytest.fixture(scope="module")
def ctl(shared_broker, tmp_path_factory) -> Iterator[Controller]:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed: apt-get install chromium (scripts/install-system-deps.sh)")
    tmp = tmp_path_factory.mktemp("ctl")
    c = Controller(controller_settings(shared_broker, tmp, broker={"client_id": f"browser-{tmp.name}"}))
    import time

    now = time.time()
    e = c.service.engine
    cable = Firing(alert_key("node:sensor_board_disconnected", "shop-a", "pi-1", "shelf-1"), "node:sensor_board_disconnected",
                   "shop-a", "pi-1", "shelf-1", "warning", "sensor board not answering: shelf 1 on shop-a/pi-1 - the USB link failed (I/O error)",
                   since=now - 3600, details="/tmp/x/shelf-1 stopped answering ([Errno 5] Input/output error)")
    disk = Firing(alert_key("disk_low", "shop-b", "pi-2"), "disk_low", "shop-b", "pi-2", "", "warning",
                  "disk almost full: shop-b/pi-2 has 3.0% free (alerts below 10%)", 3.0, since=now - 1800)
    [d] = store.sync(e, [cable, disk], now - 900).opened[1:]
    store.acknowledge(e, d.id, "olga", now - 850)
    store.sync(e, [cable], now - 300, lambda rule: 0.0)  # the disk alert resolves after 25 min
    yield c
    c.stop()


@pytest.fixture(scope="module")
def browser(ctl) -> Iterator[Browser]:
    with chromium() as b:
        yield b


def login(browser: Browser, ctl: Controller, user: str) -> tuple[Page, list[str]]:
    page, errors = watched_page(browser, ctl.url)
    page.goto("/alerts/silences")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", ctl.creds[user])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{ctl.url}/alerts/silences")
    return page, errors


def test_operator_silences_for_a_chosen_time_with_a_comment_and_undoes_it(browser, ctl):
    page, errors = login(browser, ctl, "operator")
    expect(page.locator("#silences")).to_have_count(0)
    page.select_option("#silence-form select[name=alert_id]", label="sensor board not answering: shelf 1 on shop-a/pi-1 - the USB link failed (I/O error)")
    page.select_option("#silence-form select[name=duration_s]", label="4 h")
    page.fill("#silence-form input[name=comment]", "electrician replaces the USB hub at 15:00")
    page.click("#silence-form button[type=submit]")
    row = page.locator("#silences tbody tr").first
    expect(row).to_contain_text("electrician replaces the USB hub at 15:00")
    expect(row).to_contain_text("operator")
    expect(row.locator("[data-field=state]")).to_have_text("active")
    [s] = store.list_silences(ctl.service.engine, __import__("time").time())
    assert 4 * 3600 - 120 < s.until - s.created_at <= 4 * 3600
    page.goto("/alerts")
    expect(page.locator("tr", has_text="shelf 1 on shop-a/pi-1")).to_contain_text("silenced")
    page.goto("/alerts/silences")
    page.click("#silences button[data-ap=expire]")
    expect(page.locator("#silences tbody tr").first.locator("[data-field=state]")).to_have_text("ended early by operator")
    expect(page.locator("#silences button[data-ap=expire]")).to_have_count(0)
    assert store.list_alerts(ctl.service.engine, __import__("time").time())[0].status == "firing"
    assert errors == []


def test_history_shows_node_duration_flaps_acknowledger_and_filters_by_shop(browser, ctl):
    page, errors = login(browser, ctl, "viewer")
    expect(page.locator("#silence-form")).to_have_count(0)  # a viewer cannot silence
    page.click("header nav a[href='/alerts/history']")
    expect(page).to_have_url(f"{ctl.url}/alerts/history")
    disk = page.locator("#history tr", has_text="disk almost full")
    expect(disk).to_contain_text("shop-b / pi-2")
    expect(disk.locator("[data-field=duration]")).to_have_text("25 min")
    expect(disk.locator("[data-field=acked]")).to_contain_text("olga")
    expect(disk).to_contain_text("resolved")
    cable = page.locator("#history tr", has_text="sensor board not answering")
    expect(cable.locator("[data-field=duration]")).to_contain_text("so far")
    assert "/tmp" not in cable.inner_text()  # the raw text stays behind "details", collapsed
    page.fill("#history-filter input[name=shop]", "shop-b")
    page.click("#history-filter button[type=submit]")
    expect(page).to_have_url(f"{ctl.url}/alerts/history?shop=shop-b&rule=&start=&end=")
    expect(page.locator("#history tbody tr")).to_have_count(1)
    expect(page.locator("#history tbody tr")).to_contain_text("disk almost full")
    assert errors == []

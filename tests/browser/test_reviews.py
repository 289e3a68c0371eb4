"""The review page in Debian's Chromium: a reviewer opens a cart fusion sent to review, fixes a line, accepts it.

Carts reach the controller as a shop's agent sends them (an ``Event`` on the node's events topic,
through the broker and the intake), made by the real fusion engine on a generated scenario.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from edge_agent.protocol import Event
from fleet_controller.alerts.rules import parse_rules
from fleet_controller.registry.carts import CartStore
from fleet_controller.service import ControllerService
from fleet_controller.web import reviews
from fleet_controller.web.dashboard.setup import attach
from tests.support.browser import CHROMIUM, chromium, watched_page
from tests.support.controller import Node, controller_settings
from tests.support.loop import LoopThread
from tests.support.wait import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOP = "shop-r"


class Controller(LoopThread[ControllerService]):
    """The service with the dashboard and the review pages, on a loop thread."""

    def __init__(self, settings) -> None:
        service = ControllerService(settings)
        self.dashboard = attach(service, parse_rules(""))
        self.carts: CartStore = reviews.install(service)
        super().__init__(service)
        self.dashboard.store.put_user("rita", "rita-reviews-123", "reviewer")
        self.url = self.service.api_url


@pytest.fixture(scope="module")
def controller(shared_broker, tmp_path_factory) -> Iterator[tuple[Controller, list[dict]]]:
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed: apt-get install chromium (scripts/install-system-deps.sh)")
    from fusion.generate import generate
    from fusion.sim import run

    tmp = tmp_path_factory.mktemp("ctl")
    ctl = Controller(controller_settings(shared_broker, tmp, broker={"client_id": f"browser-{tmp.name}"}))
    events = [c.to_event() for c in run(generate("slow-camera", seed=0)).carts]
    node = Node(shared_broker, SHOP, "gpu-1")
    for seq, ev in enumerate(events, start=1):
        node.send(Event(shop=SHOP, node="gpu-1", epoch="ep1", seq=seq, type=ev.pop("type"), source="fusion", data=ev))
    wait_for(lambda: len(ctl.carts.list_carts(status=None)) == len(events), what="the carts in the registry")
    yield ctl, events
    node.close()
    ctl.stop()


def test_reviewer_fixes_a_line_and_accepts(controller):
    ctl, events = controller
    review = next(e for e in events if e["lines"] and "reasons" in e)
    line = review["lines"][0]
    with chromium() as browser:
        page, errors = watched_page(browser, ctl.url)
        page.goto("/reviews")
        page.fill("input[name=username]", "rita")
        page.fill("input[name=password]", "rita-reviews-123")
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{ctl.url}/reviews")
        expect(page.locator("nav a[href='/reviews']")).to_have_attribute("aria-current", "page")
        page.click(f"#cart-queue a:text-is('{review['cart_id']}')")
        expect(page.locator("h1")).to_contain_text(review["cart_id"])
        expect(page.locator("#evidence tbody tr")).to_have_count(len(review["attributions"]))
        # Fix the first line's quantity: one more unit than fusion counted.
        row = page.locator(f"#receipt tr[data-product='{line['product']}']")
        row.locator("input[name=quantity]").fill(str(line["quantity"] + 1))
        row.locator("button[type=submit]").click()
        expect(row.locator("td.qty")).to_have_text(str(line["quantity"] + 1))
        expect(page.locator("#cart-status")).to_contain_text("corrected")
        page.fill("#accept input[name=comment]", "counted on the shelf video")
        page.click("#accept button[type=submit]")
        expect(page.locator("#cart-status")).to_contain_text("reviewed")
        expect(page.locator("h2").first).to_have_text("Receipt")
        expect(page.locator(f"#receipt tr[data-product='{line['product']}'] td.qty")).to_have_text(str(line["quantity"] + 1))
        audit = page.locator("#audit tbody tr")
        expect(audit).to_have_count(3)  # received, fix_line, accept
        expect(audit.nth(1)).to_contain_text("fix_line")
        expect(audit.nth(1)).to_contain_text("rita")
        expect(audit.nth(2)).to_contain_text("accept")
    assert errors == [], errors
    stored = ctl.carts.get(review["cart_id"])
    assert stored.status == "reviewed" and stored.corrected and stored.reviewed_by == "rita"
    assert stored.actions[1].remote == "127.0.0.1"

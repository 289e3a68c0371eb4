"""The dashboard in Debian's Chromium against a running controller: login, live badges, acks, roles, phone width."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.support.browser import SCREENSHOTS, SHOPS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_login_lists_the_shops_and_screenshots(login, fleet):
    _ctl, _ = fleet
    s = login("viewer", viewport={"width": 1280, "height": 800})
    rows = s.page.locator("#fleet-table tbody tr[data-shop]")
    expect(rows).to_have_count(3)
    for name in SHOPS.values():
        expect(s.page.locator("#fleet-table")).to_contain_text(name)
    expect(s.page.locator('tr[data-shop="shop-a"] [data-field=state]')).to_have_text("online")
    expect(s.page.locator("#live")).to_have_class("live on")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    s.page.screenshot(path=str(SCREENSHOTS / "fleet.png"), full_page=True)
    s.page.click("text=Harbour Street")
    expect(s.page.locator('[data-node-badge="shop-a/pi-1"]')).to_have_text("online")
    expect(s.page.locator("body")).to_contain_text("fridge-1")
    s.page.screenshot(path=str(SCREENSHOTS / "shop.png"), full_page=True)


def test_offline_node_changes_its_badge_without_a_reload(login, fleet):
    _ctl, nodes = fleet
    shop_page = login("viewer")
    shop_page.page.goto("/shops/shop-b")
    badge = shop_page.page.locator('[data-node-badge="shop-b/pi-1"]')
    expect(badge).to_have_text("online")
    fleet_page = login("viewer")
    expect(fleet_page.page.locator('tr[data-shop="shop-b"] [data-field=state]')).to_have_text("online")
    expect(fleet_page.page.locator("#live")).to_have_class("live on")
    expect(shop_page.page.locator("#live")).to_have_class("live on")
    for s in (shop_page, fleet_page):
        s.page.evaluate("window.__notReloaded = true")
    nodes["shop-b"].kill()  # the broker publishes its Will: presence offline
    expect(badge).to_have_text("offline", timeout=20_000)
    expect(fleet_page.page.locator('tr[data-shop="shop-b"] [data-field=state]')).to_have_text("offline", timeout=20_000)
    expect(shop_page.page.locator("#feed")).to_contain_text("offline")
    for s in (shop_page, fleet_page):
        assert s.page.evaluate("window.__notReloaded") is True


def test_operator_acknowledges_an_alert(login, fleet):
    ctl, _ = fleet
    s = login("operator")
    s.page.goto("/alerts")
    row = s.page.locator("tr[data-alert]", has_text="disk_low").first
    expect(row).to_contain_text("shop-c", timeout=20_000)
    row.locator("button[data-action=ack]").click()
    expect(s.page.locator("tr[data-alert]", has_text="disk_low").first.locator("[data-field=status]")).to_contain_text(
        "acknowledged by operator")
    assert any(a.acked_by == "operator" for a in __import__("fleet_controller.alerts.store", fromlist=["x"]).list_alerts(
        ctl.service.engine, 0) if a.rule == "disk_low")


def test_operator_silences_an_alert_for_a_chosen_time_with_a_comment(login, fleet):
    """The alerts page used to silence for exactly 1 h with no comment; the operator now chooses both."""
    import time

    from fleet_controller.alerts import store as alert_store

    ctl, _ = fleet
    s = login("operator")
    s.page.goto("/alerts")
    row = s.page.locator("tr[data-alert]", has_text="disk_low").first
    expect(row).to_contain_text("shop-c", timeout=20_000)
    row.locator(".silence-form summary").click()
    row.locator("[data-silence-duration]").select_option("14400")
    row.locator("[data-silence-comment]").fill("disk swap booked for tonight")
    row.locator("button[data-action=silence]").click()
    expect(s.page.locator("tr[data-alert]", has_text="disk_low").first.locator("[data-field=status]")).to_contain_text("until")
    now = time.time()
    (mine,) = [v for v in alert_store.list_silences(ctl.service.engine, now) if v.comment == "disk swap booked for tonight"]
    assert mine.created_by == "operator" and 4 * 3600 - 120 < mine.until - now <= 4 * 3600


def test_viewer_has_no_alert_buttons(login):
    s = login("viewer")
    s.page.goto("/alerts")
    expect(s.page.locator("tr[data-alert]").first).to_be_visible(timeout=20_000)
    expect(s.page.locator("button[data-action]")).to_have_count(0)


def test_operator_neither_sees_nor_reaches_rollout_controls(login):
    op = login("operator")
    op.page.goto("/rollouts")
    expect(op.page.locator("#rollouts article.rollout")).to_have_count(1)
    expect(op.page.locator("#rollouts-readonly")).to_be_visible()
    expect(op.page.locator("button[data-action^=rollout-]")).to_have_count(0)
    expect(op.page.locator("#rollouts")).to_contain_text("wave 0 canary (current)")
    expect(op.page.locator("#releases")).to_contain_text("2026.11-r2")
    op.expected_failures.add("/api/v1/rollouts/1/pause")
    status = op.page.evaluate("""async () => {
        const csrf = document.querySelector('meta[name=csrf-token]').content;
        const r = await fetch('/api/v1/rollouts/1/pause', {method: 'POST', headers: {'X-CSRF-Token': csrf}});
        return r.status; }""")
    assert status == 403
    ml = login("mlops")
    ml.page.goto("/rollouts")
    expect(ml.page.locator("button[data-action=rollout-pause]")).to_have_count(1)
    expect(ml.page.locator("button[data-action=rollout-resume]")).to_have_count(0)  # only what the state allows
    ml.page.click("button[data-action=rollout-pause]")
    expect(ml.page.locator("#rollouts")).to_contain_text("state: paused")
    ml.page.click("button[data-action=rollout-resume]")
    expect(ml.page.locator("#rollouts")).to_contain_text("state: running")


def test_phone_width(login):
    s = login("operator", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    for path in ("/fleet", "/shops/shop-a", "/alerts", "/rollouts"):
        s.page.goto(path)
        width = s.page.evaluate("document.documentElement.scrollWidth")
        widest = s.page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 392)
            .slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id + ' ' + Math.round(e.getBoundingClientRect().right))""")
        assert width <= 390, f"{path} is {width}px wide at phone width: {widest}"
    s.page.goto("/fleet")
    expect(s.page.locator('tr[data-shop="shop-a"] td[data-label=Shop]')).to_be_visible()
    s.page.screenshot(path=str(SCREENSHOTS / "fleet-phone.png"), full_page=True)


def test_admin_removes_a_retired_node_and_its_retained_presence(login, fleet, shared_broker):
    """Remove node on the shop page: confirmed, DELETE with the session's CSRF token, gone from the page, the registry and the
    broker's retained presence (which would bring it back at the controller's next subscription); an operator has no button."""
    import paho.mqtt.client as paho

    from edge_agent.protocol import Topics
    from fleet_controller.registry.read import NotFound
    from tests.support.controller import Node, heartbeat, presence
    from tests.support.wait import wait_for

    ctl, _ = fleet
    old = Node(shared_broker, "shop-a", "pi-9")
    old.send(presence("shop-a", "pi-9"), retain=True)
    old.send(heartbeat("shop-a", "pi-9", seq=1, interval=30))
    wait_for(lambda: any(n.node == "pi-9" for n in ctl.service.reader.get_shop("shop-a").nodes), what="pi-9 in the registry")
    old.close()  # retired (a clean disconnect): its retained birth stays on the broker

    op = login("operator")
    op.page.goto("/shops/shop-a")
    expect(op.page.locator("[data-node-badge='shop-a/pi-9']")).to_be_visible()
    expect(op.page.locator("form[data-remove-node]")).to_have_count(0)

    s = login("admin")
    s.page.goto("/shops/shop-a")
    form = s.page.locator("form[data-remove-node]")
    form.locator("select[name=node]").select_option("pi-9")
    dialogs: list[str] = []
    s.page.once("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    form.locator("button[type=submit]").click()
    expect(s.page.locator("[data-node-badge='shop-a/pi-9']")).to_have_count(0, timeout=20_000)
    assert "Remove node pi-9 of shop shop-a for good?" in dialogs[0]
    expect(s.page.locator("[data-node-badge='shop-a/pi-1']")).to_be_visible()
    with pytest.raises(NotFound):
        ctl.service.reader.get_node("shop-a", "pi-9")

    got: list[bytes] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="retained-probe")
    c.on_message = lambda _c, _u, m: got.append(m.payload)
    c.connect("127.0.0.1", shared_broker.port)
    c.subscribe([(Topics.node("shop-a", "pi-9", "presence"), 1), (Topics.node("shop-a", "pi-1", "presence"), 1)])
    c.loop_start()
    wait_for(lambda: got, 10, "pi-1's retained presence")  # the probe works ...
    c.loop_stop()
    c.disconnect()
    assert len(got) == 1  # ... and pi-9 has none left

"""The 24/7 operator's console in Debian's Chromium: issue 13, problems 1, 2, 4 and 5, the docs, and the page basics.

Each test names in its docstring what the code before it did; each assertion that follows fails
on that code. The controller, shops and browser are those of ``tests/support/browser.py`` (a real service with
the dashboard attached as in production, shops speaking the wire protocol over a real broker).
"""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect
from sqlalchemy import update

from edge_agent.protocol import PipelineHealth
from fleet_controller.alerts import store as alert_store
from fleet_controller.rollout.releases import ReleaseSpec, ReleaseStore
from fleet_controller.rollout.store import (
    ROLLOUTS,
    RSHOPS,
    action_scope,
    list_rollouts,
    record_failure,
    request_action,
)
from tests.support.browser import Controller, Session, facts
from tests.support.controller import controller_settings, heartbeat
from tests.support.wait import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CAM_OK = {"cam-entrance": PipelineHealth(kind="vision", state="running", fps=14.8, last_frame_age_s=0.07),
          "arduino-shelf": PipelineHealth(kind="hardware", state="running")}
SEQ = iter(range(100, 10_000))


def send_heartbeat(nodes, shop: str, *, fps: float = 14.8, disk_free_gib: float = 40.0) -> None:
    pipes = {**CAM_OK, "cam-entrance": PipelineHealth(kind="vision", state="running", fps=fps, last_frame_age_s=0.07)}
    nodes[shop].send(heartbeat(shop, "pi-1", seq=next(SEQ), interval=30, facts=facts(disk_free_gib, f"{shop}-pi"),
                               pipelines=pipes, release="2026.11-r1"))


# ----- problem 1: a visible disconnected state within 5 s, reconnect and resync ---------------------


@pytest.fixture
def own_controller(shared_broker, tmp_path):
    """A controller of its own, so the test can stop it and start it again on the same port and database."""
    settings = controller_settings(shared_broker, tmp_path, broker={"client_id": f"browser-{tmp_path.name}"})
    ctl = Controller(settings)
    ctl.call(ctl.service.writer.register_shop("shop-z", name="Quay Kiosk", region="east"))
    holder = {"ctl": ctl, "settings": settings}
    yield holder
    holder["ctl"].stop()


def test_losing_the_controller_shows_disconnected_within_5_s_then_reconnects_and_resyncs(browser, own_controller, monkeypatch):
    """Before: the green "live updates on" dot stayed green for 90 s with the controller stopped,
    the page never said its values were stale, and Acknowledge said "Failed: Failed to fetch"."""
    ctl = own_controller["ctl"]
    s = Session(browser, ctl.url, "operator", ctl.creds["operator"])
    try:
        live = s.page.locator("#live")
        expect(live).to_have_class("live on")
        expect(s.page.locator("#live-text")).to_have_text("live")
        expect(s.page.locator("#stale-banner")).to_be_hidden()
        port = int(ctl.url.rsplit(":", 1)[1])
        ctl.stop()
        stopped = time.monotonic()
        expect(s.page.locator("#stale-banner")).to_be_visible(timeout=5_000)
        assert time.monotonic() - stopped <= 5.0
        expect(live).to_have_class("live off")
        expect(s.page.locator("#live-text")).to_have_text("disconnected")
        expect(s.page.locator("#stale-banner")).to_contain_text("the values on this page are stale")
        expect(s.page.locator("main")).to_have_class(re.compile(r"\bstale\b"))
        s.page.evaluate("window.__notReloaded = true")
        # The controller comes back on the same address and database, with a shop added meanwhile.
        settings = own_controller["settings"].model_copy(update={"api": own_controller["settings"].api.model_copy(update={"port": port})})
        from tests.support import browser

        monkeypatch.setattr(browser, "role_users", lambda store: ctl.creds)  # keep the users and so the browser's session
        ctl2 = Controller(settings)
        own_controller["ctl"] = ctl2
        ctl2.call(ctl2.service.writer.register_shop("shop-y", name="Mill Lane", region="east"))
        s.expected_failures.update({"/api/v1/live", "/fleet", "/api/v1/alerts?state=firing"})  # refused while it was down
        expect(s.page.locator("#live-text")).to_have_text("live", timeout=15_000)
        expect(s.page.locator("#stale-banner")).to_be_hidden()
        expect(s.page.locator('#fleet-table tr[data-shop="shop-y"]')).to_have_count(1, timeout=10_000)  # resynced
        assert s.page.evaluate("window.__notReloaded") is True
        s.errors = [e for e in s.errors if "ERR_CONNECTION_REFUSED" not in e and "Failed to load resource" not in e]
        assert s.errors == []
    finally:
        s.close()


# ----- problem 2: the shop page agrees with itself and stays current -------------------------------


def test_the_shop_page_updates_every_value_live_and_agrees_with_itself(login, fleet):
    """Before: only events, node badges and the alerts section updated live; 45 s later the page
    still showed the old fps in red, and the summary said "Alerts: 2" while the section said "Nothing firing"."""
    ctl, nodes = fleet
    s = login("viewer")
    s.page.goto("/shops/shop-b")
    s.page.evaluate("window.__notReloaded = true")
    fps_cell = s.page.locator('#shop-cameras td[data-label="FPS"]').first
    expect(fps_cell).to_have_text("14.8")
    expect(s.page.locator("#shop-alert-count")).to_have_text("0")
    send_heartbeat(nodes, "shop-b", fps=1.9, disk_free_gib=1.0)  # a slow camera and a nearly full disk
    expect(fps_cell).to_have_text("1.9", timeout=15_000)
    expect(fps_cell).to_have_class("bad")
    rows = s.page.locator("#alerts tr[data-alert]")
    expect(rows.filter(has_text="disk_low")).to_have_count(1, timeout=20_000)
    expect(s.page.locator("#shop-alert-count")).to_have_text(str(rows.count()), timeout=10_000)
    send_heartbeat(nodes, "shop-b", fps=14.8, disk_free_gib=40.0)
    expect(fps_cell).to_have_text("14.8", timeout=15_000)
    wait_for(lambda: not alert_store.list_alerts(ctl.service.engine, time.time(), shop="shop-b"), what="disk_low resolved")
    expect(s.page.locator("#alerts")).to_contain_text("Nothing firing", timeout=15_000)
    expect(s.page.locator("#shop-alert-count")).to_have_text("0")
    seen = s.page.locator('[data-node="pi-1"] [data-ts]').first
    first = seen.text_content()
    expect(seen).not_to_have_text(first or "", timeout=5_000)  # relative times tick, every second
    assert s.page.evaluate("window.__notReloaded") is True


# ----- problem 4: rollouts from the UI, confirmed scopes, failures kept ------------------------------


def _abort_active(ctl) -> None:
    for r in list_rollouts(ctl.service.engine):
        if r["status"] in ("running", "paused"):
            request_action(ctl.service.engine, r["id"], "abort", confirm=action_scope(ctl.service.engine, r["id"], "abort")["token"])


def test_ml_engineer_starts_a_rollout_after_previewing_its_plan(login, fleet):
    """Before: there was no way to start a rollout from the UI."""
    ctl, _ = fleet
    _abort_active(ctl)
    ReleaseStore(ctl.service.engine).create(
        ReleaseSpec(name="2026.12-r3", version="3", images={"vision": "reg.example/vision@sha256:" + "7a" * 32}))
    s = login("mlops")
    s.page.goto("/rollouts")
    s.page.click("#new-rollout summary")
    s.page.select_option("#rollout-release", "2026.12-r3")
    s.page.fill("input[name=canary]", "shop-b")
    s.page.fill("input[name=percents]", "100")
    s.page.fill("input[name=windows]", "02:00-05:00")
    s.page.fill("input[name=exclude]", "shop-c")
    s.page.click("#rollout-preview-btn")
    preview = s.page.locator("#rollout-preview")
    expect(preview).to_contain_text("Plan: 2026.12-r3 to 2 shops in 2 waves")
    expect(preview.locator('tr[data-wave="canary"]')).to_contain_text("shop-b")
    expect(preview.locator('tr[data-wave="all"]')).to_contain_text("shop-a")
    expect(preview).to_contain_text("Windows: local 02:00-05:00")
    expect(preview).to_contain_text("shop-c (excluded)")
    assert [r["release"] for r in list_rollouts(ctl.service.engine)].count("2026.12-r3") == 0  # a preview starts nothing
    s.page.click("#rollout-start")
    card = s.page.locator("#rollouts article.rollout").first
    expect(card).to_contain_text("2026.12-r3")
    expect(card).to_contain_text("state: running")
    newest = list_rollouts(ctl.service.engine)[0]
    assert newest["release"] == "2026.12-r3" and newest["status"] == "running"


def test_rollback_asks_for_confirmation_naming_its_scope_and_a_failed_rollout_keeps_its_gate(login, fleet):
    """Before: Rollback was one click with no confirmation; clicking it on a failed rollout
    replaced the failure reason with "rollback requested"; "Gate failures" listed
    "shop-a: back on 2026.11-r1", not the check that failed."""
    ctl, _ = fleet
    engine = ctl.service.engine
    rollouts = list_rollouts(engine)
    rid = rollouts[0]["id"] if rollouts and rollouts[0]["status"] in ("running", "paused") else None
    if rid is None:
        from fleet_controller.rollout.policy import policy_from_dict
        from fleet_controller.rollout.store import start_rollout
        rid = start_rollout(engine, "2026.11-r2", policy_from_dict({"waves": [{"name": "canary", "shops": ["shop-a"]}, {"name": "all", "percent": 100}]}))["id"]
    # What the executor leaves after the fps gate failed the canary and its wave was rolled back.
    why = "gate fps: pi-1/cam-entrance runs at 1.9 fps, below 5.0"
    with engine.begin() as conn:
        shop = conn.execute(RSHOPS.select().where(RSHOPS.c.rollout_id == rid).order_by(RSHOPS.c.wave)).first().shop_id
        record_failure(conn, rid, shop, "fps", why, 1.9, 5.0, time.time())
        conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == rid, RSHOPS.c.shop_id == shop)
                     .values(state="rolled_back", reason="back on 2026.11-r1"))
        conn.execute(update(RSHOPS).where(RSHOPS.c.rollout_id == rid, RSHOPS.c.state == "pending").values(state="skipped", reason="rollout halted"))
        conn.execute(update(ROLLOUTS).where(ROLLOUTS.c.id == rid).values(status="failed", reason=f"wave 0 failed: {shop}: {why}"))
    s = login("mlops")
    s.page.goto("/rollouts")
    card = s.page.locator(f'article[data-rollout="{rid}"]')
    failure = f"{shop}: gate fps: pi-1/cam-entrance runs at 1.9 fps, below 5.0 (measured 1.9, threshold 5)"
    expect(card.locator("[data-field=failure]")).to_contain_text(failure)
    expect(card.locator(".gate-failures")).to_have_text(failure)
    s.page.evaluate("window.__rolledBack = 0")
    card.locator("button[data-action=rollout-rollback]").click()
    dialog = s.page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    expect(dialog.locator("#confirm-scope")).to_contain_text(f"Roll back rollout #{rid}")
    s.page.click("#confirm-cancel")
    expect(dialog).to_be_hidden()
    assert list_rollouts(engine)[0 if list_rollouts(engine)[0]["id"] == rid else 1]["status"] == "failed"  # cancel did nothing
    card.locator("button[data-action=rollout-rollback]").click()
    expect(dialog).to_be_visible()
    s.page.fill("#confirm-reason", "cleaning up after the fps failure")
    s.page.click("#confirm-ok")
    expect(card).to_contain_text("state: rolling_back", timeout=10_000)
    expect(card).to_contain_text(f"wave 0 failed: {shop}: {why}")  # the reason stayed
    expect(card.locator("[data-field=failure]")).to_contain_text(failure)
    expect(card.locator(".gate-failures")).to_have_text(failure)
    expect(card).not_to_contain_text("Gate failures" + "rollback requested")


# ----- problem 5: the fleet page surfaces trouble --------------------------------------------------------


def test_the_fleet_page_turns_a_struggling_shop_amber_and_sorts_it_first(login, fleet):
    """Before: a shop at 2.2 fps showed green "online" and 0 alerts, with no camera, rollout or node-total column."""
    _ctl, nodes = fleet
    send_heartbeat(nodes, "shop-a", fps=2.2)
    s = login("viewer")
    row = s.page.locator('#fleet-table tr[data-shop="shop-a"]')
    expect(row).to_have_attribute("data-health", re.compile("warn|bad"), timeout=15_000)
    expect(row.locator("[data-field=health]")).to_contain_text("camera pi-1/cam-entrance: 2.2 fps < 5")
    expect(row.locator("[data-field=state]")).to_have_text("online")  # online, and still not fine
    expect(row.locator("[data-field=cameras]")).to_contain_text("1 degraded")
    expect(s.page.locator("#node-totals")).to_contain_text(re.compile(r"Nodes: \d+ of \d+ online"))
    healths = s.page.locator("#fleet-table tr[data-shop]").evaluate_all("rows => rows.map(r => r.dataset.health)")
    rank = {"bad": 0, "warn": 1, "unknown": 2, "ok": 3}
    assert [rank[h] for h in healths] == sorted(rank[h] for h in healths), healths  # worst first by default
    s.page.check("input[name=group]")
    s.page.click(".filters button[type=submit]")
    expect(s.page.locator("#fleet-table tr.group")).to_have_count(2)  # north and south
    expect(s.page.locator("#fleet-table tr.group").first).to_have_text("north")
    send_heartbeat(nodes, "shop-a", fps=14.8)
    expect(s.page.locator('#fleet-table tr[data-shop="shop-a"]')).to_have_attribute("data-health", re.compile("ok|warn"), timeout=15_000)


# ----- the docs, the headers, dark mode, the skip link, touch targets ----------------------------------------


def test_docs_and_redoc_render_with_no_external_request(login, fleet):
    """Before: /docs was blank because Swagger UI loaded from a CDN (and ran inline script, which the CSP now forbids)."""
    ctl, _ = fleet
    s = login("viewer")
    requests: list[str] = []
    s.page.on("request", lambda r: requests.append(r.url))
    s.page.goto("/docs")
    expect(s.page.locator(".swagger-ui .info .title")).to_contain_text("shopfleet fleet controller", timeout=15_000)
    expect(s.page.locator(".swagger-ui .opblock-tag").first).to_be_visible()
    s.page.goto("/redoc")
    expect(s.page.locator("#redoc h1")).to_contain_text("shopfleet fleet controller", timeout=20_000)
    external = [u for u in requests if not (u.startswith(ctl.url) or u.startswith(("data:", "blob:")))]
    assert external == [], external


def test_pages_send_security_headers_and_run_under_the_csp(login):
    """Before: no CSP, X-Frame-Options, nosniff or Referrer-Policy (issue 10, item 6).
    Any CSP violation on these pages would be a console error and fail the session's check."""
    s = login("operator")
    for path in ("/fleet", "/shops/shop-a", "/alerts", "/rollouts"):
        r = s.page.goto(path)
        h = r.headers
        assert "script-src 'self'" in h["content-security-policy"] and "frame-ancestors 'none'" in h["content-security-policy"]
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "same-origin"
        expect(s.page.locator("#live-text")).to_have_text("live")


def test_dark_mode_skip_link_and_touch_targets(login):
    """Before: no dark mode, no skip link, and menu links under 24 px (far under 44 px) on a phone."""
    s = login("operator", viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True, color_scheme="dark")
    s.page.goto("/fleet")
    bg = s.page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(13, 17, 23)", bg
    s.page.keyboard.press("Tab")
    skip = s.page.locator("a.skip")
    expect(skip).to_be_focused()
    expect(skip).to_be_visible()
    skip.press("Enter")
    expect(s.page.locator("main#main")).to_be_focused()
    for path in ("/fleet", "/alerts", "/rollouts", "/shops/shop-a"):
        s.page.goto(path)
        small = s.page.evaluate("""() => [...document.querySelectorAll(
              'header nav a, header button, main button, main select, main input:not([type=checkbox]), .pager a, th a.sort, td[data-label=Shop] a')]
            .filter(e => e.offsetParent !== null)
            .map(e => [e.textContent.trim() || e.name || e.tagName, e.getBoundingClientRect().height])
            .filter(([, h]) => h < 44)""")
        assert small == [], f"{path}: touch targets under 44 px: {small}"
    s.page.set_viewport_size({"width": 1280, "height": 800})
    s.page.goto("/fleet")
    heights = s.page.locator("header nav a").evaluate_all("els => els.map(e => e.getBoundingClientRect().height)")
    assert min(heights) >= 24, heights

"""The dashboard: fleet table queries on both engines, shop shaping, pages over HTTP, live updates."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import parse_qsl

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from edge_agent.protocol import NodeFacts, PipelineHealth, Reading, Telemetry
from fleet_controller.alerts import store as alert_store
from fleet_controller.alerts.evaluator import Firing
from fleet_controller.registry.bus import BusEvent, EventBus
from fleet_controller.registry.read import RegistryReader
from fleet_controller.web.dashboard.charts import sparkline
from fleet_controller.web.dashboard.fleetview import FleetQuery, fleet_page
from fleet_controller.web.dashboard.live import LiveHub
from fleet_controller.web.dashboard.router import parse_fleet_query, query_string
from fleet_controller.web.dashboard.setup import forward_bus
from tests.support.controller import batch, csrf_of, heartbeat, login, presence

NOW = 1_800_000_000.0


def populate(registry, shops: int = 30) -> None:
    """Shops s00..: every 3rd offline, every 5th stale-ish (one of two nodes down), regions a/b, releases r1/r2."""
    for i in range(shops):
        shop = f"s{i:02d}"
        registry.register_shop(shop, name=f"Shop {i}", region="north" if i % 2 else "south")
        msgs = [presence(shop=shop, node="pi-1"), heartbeat(shop=shop, node="pi-1", seq=1, release="r2" if i % 4 == 0 else "r1")]
        if i % 5 == 0:
            msgs += [presence(shop=shop, node="gpu-1"), heartbeat(shop=shop, node="gpu-1", seq=1)]
        msgs.append(Telemetry(shop=shop, node="pi-1", epoch="ep1", seq=2, readings=(Reading(name="occupancy", value=i % 7),)))
        registry.write_batch(batch(*msgs, at=NOW - 10), NOW - 10)
        if i % 3 == 0:
            registry.write_batch(batch(presence(shop=shop, node="pi-1", state="offline"), at=NOW), NOW)
        if i % 5 == 0 and i % 3 != 0:
            registry.write_batch(batch(presence(shop=shop, node="gpu-1", state="offline"), at=NOW), NOW)
    alert_store.sync(registry.engine, [Firing(f"disk_low/s0{i}/pi-1/", "disk_low", f"s0{i}", "pi-1", "", "warning", "disk", 1.0)
                                       for i in (1, 2)], NOW)


def test_fleet_page_states_filters_sort_and_pages(registry):
    populate(registry)
    e = RegistryReader(registry.engine)
    p = fleet_page(e, FleetQuery(per_page=10))
    assert p.total == 30 and p.pages == 3 and len(p.rows) == 10
    # pi-1 offline when i % 3 == 0; a gpu-1 when i % 5 == 0, offline unless pi-1 is: a shop with
    # one node up and one down is "stale", with none up "offline".
    assert p.state_counts == {"offline": 8, "stale": 6, "online": 16, "unknown": 0}
    assert [r["state"] for r in p.rows] == ["offline"] * 8 + ["stale"] * 2  # needs-someone first
    assert [r["id"] for r in fleet_page(e, FleetQuery(state="stale")).rows] == ["s00", "s05", "s10", "s15", "s20", "s25"]
    north = fleet_page(e, FleetQuery(region="north", per_page=500))
    assert north.total == 15 and all(r["region"] == "north" for r in north.rows)
    r2 = fleet_page(e, FleetQuery(release="r2", per_page=500))
    assert sorted(r["id"] for r in r2.rows) == [f"s{i:02d}" for i in range(0, 30, 4)]
    assert fleet_page(e, FleetQuery(q="shop 2")).total == 11  # "Shop 2", "Shop 20".."Shop 29"
    alerting = fleet_page(e, FleetQuery(alerting=True, sort="alerts", desc=True))
    assert [(r["id"], r["alerts"]) for r in alerting.rows] == [("s01", 1), ("s02", 1)]
    by_occ = fleet_page(e, FleetQuery(sort="occupancy", desc=True, per_page=3)).rows
    assert [r["occupancy"] for r in by_occ] == [6, 6, 6]
    last = fleet_page(e, FleetQuery(sort="id", page=3, per_page=10)).rows
    assert [r["id"] for r in last][-1] == "s29"
    assert p.regions == ["north", "south"] and p.releases == ["r1", "r2"]


@given(st.dictionaries(st.sampled_from(["q", "region", "state", "sort", "desc", "page", "per_page", "alerting", "bogus"]),
                       st.text(max_size=12), max_size=6))
def test_parse_fleet_query_accepts_or_names_the_problem(params):
    try:
        q = parse_fleet_query(params)
    except ValidationError as exc:
        assert exc.errors()
    else:
        assert 1 <= q.per_page <= 500 and q.page >= 1


@given(st.builds(FleetQuery, q=st.text(max_size=20), page=st.integers(1, 100), desc=st.booleans(),
                 sort=st.sampled_from(["id", "alerts", "last_seen"]), state=st.sampled_from(["", "offline"])))
def test_query_string_round_trips(query):
    assert parse_fleet_query(dict(parse_qsl(query_string(query)))) == query


@pytest.mark.parametrize(
    ("values", "points"),
    [
        pytest.param([], "", id="empty"),
        pytest.param([None, None], "", id="all-missing"),
        pytest.param([1.0, 3.0], "2.0,26.0 118.0,2.0", id="rising"),
        pytest.param([2.0, None, 2.0], "2.0,26.0 118.0,26.0", id="flat-with-gap"),
    ],
)
def test_sparkline(values, points):
    assert sparkline(values) == points


# ----- over HTTP ------------------------------------------------------------------------------------------


def test_fleet_page_and_api(web, registry):
    populate(registry)
    app, creds, _ = web
    c = TestClient(app)
    login(c, "viewer", creds["viewer"])
    html = c.get("/fleet?state=stale&per_page=2").text
    assert re.findall(r'<tr data-shop="([^"]+)"', html) == ["s00", "s05"]
    assert "Page 1 of 3" in html and 'href="?state=stale&amp;page=2&amp;per_page=2"' in html
    data = c.get("/api/v1/fleet", params={"sort": "id", "per_page": 5}).json()
    assert data["total"] == 30 and [r["id"] for r in data["rows"]] == ["s00", "s01", "s02", "s03", "s04"]
    r = c.get("/fleet?sort=nonsense")
    assert r.status_code == 400 and "Clear the filters" in r.text
    assert c.get("/api/v1/fleet?per_page=100000").status_code == 422


def test_shop_page_shows_nodes_cameras_fridges_shelves_door(web, registry):
    facts = NodeFacts(arch="arm64", node_class="pi", cpu_count=4, cpu_load_1m=0.5, mem_total_bytes=4 << 30,
                      mem_available_bytes=1 << 30, disk_total_bytes=32 << 30, disk_free_bytes=8 << 30, hostname="pi-host")
    pipes = {"cam-door": PipelineHealth(kind="vision", state="running", fps=2.5, last_frame_age_s=0.3)}
    msgs = [presence(shop="s1", node="pi-1")] + [heartbeat(shop="s1", node="pi-1", seq=i, facts=facts, pipelines=pipes) for i in (1, 2, 3)]
    msgs.append(Telemetry(shop="s1", node="pi-1", epoch="ep1", seq=4, readings=(
        Reading(name="temperature_c", value=9.2, unit="C", source="fridge-1"),
        Reading(name="shelf_weight_g", value=1234.5, unit="g", source="shelf-a/slot-3"),
        Reading(name="door_open", value=1, source="door-1"),
    )))
    registry.write_batch(batch(*msgs, at=NOW), NOW)
    app, creds, _ = web
    c = TestClient(app)
    login(c, "viewer", creds["viewer"])
    html = c.get("/shops/s1").text
    assert 'data-node-badge="s1/pi-1">online' in html and "pi-host" in html
    assert "cam-door" in html and 'class="bad">2.5' in html  # below the 5 fps default
    assert "fridge-1" in html and "alert &gt; 8.0 °C, clears &lt; 7.0 °C" in html and "fridge-warm" in html
    assert "shelf-a/slot-3" in html and "1234.5 g" in html
    assert 'id="door">open' in html
    assert html.count("<polyline") == 4
    r = c.get("/shops/nope")
    assert r.status_code == 404 and "does not know shop" in r.text


def test_alert_actions_for_operator_not_viewer(web, registry):
    [a] = alert_store.sync(registry.engine, [Firing("disk_low/s1/pi-1/", "disk_low", "s1", "pi-1", "", "warning", "disk 3%", 3.0)], NOW).opened
    app, creds, _hub = web
    viewer = TestClient(app)
    login(viewer, "viewer", creds["viewer"])
    assert "data-action=\"ack\"" not in viewer.get("/alerts").text
    op = TestClient(app)
    login(op, "operator", creds["operator"])
    assert f'data-action="ack" data-id="{a.id}"' in op.get("/alerts").text
    r = op.post(f"/api/v1/alerts/{a.id}/ack", headers={"X-CSRF-Token": csrf_of(op)})
    assert r.status_code == 200 and r.json()["status"] == "acknowledged" and r.json()["acked_by"] == "operator"
    r = op.post(f"/api/v1/alerts/{a.id}/silence", headers={"X-CSRF-Token": csrf_of(op)}, json={"duration_s": 600, "bogus": 1})
    assert r.status_code == 422
    r = op.post(f"/api/v1/alerts/{a.id}/silence", headers={"X-CSRF-Token": csrf_of(op)}, json={"duration_s": 600})
    assert r.json()["status"] == "silenced"
    assert [x["status"] for x in op.get("/api/v1/alerts").json()] == ["silenced"]


# ----- live updates -----------------------------------------------------------------------------------------


async def test_hub_streams_bus_events_as_sse_and_drops_when_full():
    mreg = CollectorRegistry()
    hub = LiveHub(mreg)
    bus = EventBus()
    fwd = asyncio.create_task(forward_bus(bus, hub))
    stream = hub.stream(ping_s=0.05, clock=lambda: NOW)
    assert await anext(stream) == "retry: 3000\n\n"
    assert await anext(stream) == f"event: ping\ndata: {{\"at\":{NOW:.3f}}}\n\n"  # at once: the browser knows it is live
    nxt = asyncio.create_task(anext(stream))

    async def subscribed() -> None:
        while bus.subscribers == 0:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(subscribed(), 5)  # the forwarder subscribed: publishing now reaches the stream
    bus.publish(BusEvent("presence", "s1", "pi-1", {"old": "online", "new": "offline", "reason": "will"}, at=NOW))
    frame = await asyncio.wait_for(nxt, 5)
    assert frame.startswith("event: presence\ndata: ") and '"new":"offline"' in frame and '"shop":"s1"' in frame
    assert (await asyncio.wait_for(anext(stream), 5)).startswith("event: ping\n")  # idle: a ping for the watchdog
    for i in range(300):  # nobody reads: the queue (256) fills and the rest is dropped, the publisher never blocks
        hub.publish("alert_changed", {"i": i})
    assert mreg.get_sample_value("shopfleet_dashboard_live_dropped_total") == 300 - 256
    fwd.cancel()
    await stream.aclose()
    assert mreg.get_sample_value("shopfleet_dashboard_live_subscribers") == 0


def test_summary_cache_rereads_after_max_age_or_a_state_change(registry):
    from fleet_controller.web.dashboard.fleetview import SummaryCache

    registry.register_shop("s1")
    t = [0.0]
    cache = SummaryCache(RegistryReader(registry.engine), max_age_s=2.0, clock=lambda: t[0])
    assert [r["id"] for r in cache.rows()] == ["s1"]
    registry.register_shop("s2")
    assert len(cache.rows()) == 1  # still fresh enough
    t[0] = 2.5
    assert len(cache.rows()) == 2
    registry.register_shop("s3")
    cache.invalidate()
    assert len(cache.rows()) == 3



def test_a_live_state_change_refreshes_the_fleet_table_at_once(web, registry):
    app, creds, hub = web
    c = TestClient(app)
    login(c, "viewer", creds["viewer"])
    registry.register_shop("s1")
    assert c.get("/api/v1/fleet").json()["total"] == 1
    registry.register_shop("s2")
    hub.publish("shop_added", {"shop": "s2"})
    assert c.get("/api/v1/fleet").json()["total"] == 2


@pytest.mark.parametrize(
    ("query", "ids"),
    [
        pytest.param(FleetQuery(), ["c", "b", "d", "a"], id="needs-someone-first"),
        pytest.param(FleetQuery(sort="last_seen", desc=True), ["a", "b", "c", "d"], id="last-seen-desc-unknown-last"),
        pytest.param(FleetQuery(sort="last_seen"), ["c", "b", "a", "d"], id="last-seen-asc-unknown-last"),
        pytest.param(FleetQuery(sort="alerts", desc=True), ["b", "a", "c", "d"], id="alerts-desc-ties-by-id"),
        pytest.param(FleetQuery(sort="name", desc=True), ["d", "c", "b", "a"], id="name-desc"),
        pytest.param(FleetQuery(state="online"), ["a"], id="filter-state"),
        pytest.param(FleetQuery(q="B"), ["b"], id="search-case-insensitive"),
        pytest.param(FleetQuery(per_page=1, page=2), ["b"], id="second-page"),
        pytest.param(FleetQuery(per_page=1, page=9), [], id="past-the-end"),
    ],
)
def test_select_page_table(query, ids):
    from fleet_controller.web.dashboard.fleetview import select_page, shop_state

    def row(i, nodes, online, stale, alerts, seen):
        return {"id": i, "name": i.upper(), "region": "r", "state": shop_state(nodes, online, stale), "nodes": nodes,
                "online": online, "stale": stale, "alerts": alerts, "occupancy": None, "release": "", "last_seen": seen}

    rows = [row("a", 1, 1, 0, 0, 30.0), row("b", 2, 1, 1, 2, 20.0), row("c", 1, 0, 0, 0, 10.0), row("d", 0, 0, 0, 0, None)]
    page = select_page(rows, query)
    assert [r["id"] for r in page.rows] == ids
    assert page.state_counts == ({"online": 1, "stale": 1, "offline": 1, "unknown": 1} if not query.q else
                                 {"online": 0, "stale": 1, "offline": 0, "unknown": 0})


# ----- security headers and API docs -------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(web):
    """Before: no CSP, X-Frame-Options, nosniff or Referrer-Policy on any response (issue 10, item 6)."""
    app, creds, _ = web
    c = TestClient(app)
    for path in ("/login", "/healthz", "/static/dashboard.css", "/docs", "/openapi.json", "/nope"):
        r = c.get(path, follow_redirects=False)
        csp = r.headers.get("content-security-policy", "")
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0], path
        assert "frame-ancestors 'none'" in csp, path
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["referrer-policy"] == "same-origin", path
    login(c, "viewer", creds["viewer"])
    assert "content-security-policy" in c.get("/fleet").headers


def test_docs_pages_use_only_vendored_assets_and_no_inline_script(web):
    """Before: /docs and /redoc loaded Swagger UI and ReDoc from a CDN and started them with inline script."""
    app, _, _ = web
    c = TestClient(app)
    for path in ("/docs", "/redoc"):
        html = c.get(path).text
        srcs = [s for s in re.findall(r'(?:src|href)="([^"]+)"', html) if s != "data:,"]  # data:, = no favicon request
        assert srcs and all(s.startswith("/static/") for s in srcs), srcs
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], "inline script"
        for s in srcs:
            r = c.get(s)
            assert r.status_code == 200 and len(r.content) > 100, s
    assert c.get("/static/vendor/swagger-ui/LICENSE").status_code == 200
    assert c.get("/static/vendor/../app.py").status_code == 404


def test_templates_hold_no_inline_script():
    """The CSP forbids inline script; a template that grew one would silently break in the browser."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "fleet_controller" / "web"
    for t in root.rglob("*.html"):
        text = t.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), f"{t} has an inline <script>"
        assert not re.search(r"\son[a-z]+\s*=", text), f"{t} has an inline event handler"

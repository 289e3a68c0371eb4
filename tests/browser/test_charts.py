"""Charts over time in Debian's Chromium: uPlot from the package, axes, hover values, ranges, node charts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.support.browser import SCREENSHOTS, chromium, watched_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def page(fleet) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A viewer's page on shop-a, recording every request URL and every console error."""
    ctl, _ = fleet
    with chromium() as browser:
        pg, errors = watched_page(browser, ctl.url, viewport={"width": 1280, "height": 900})
        requests: list[str] = []
        pg.on("request", lambda r: requests.append(r.url))
        pg.goto("/login?next=/shops/shop-a")
        pg.fill("input[name=username]", "viewer")
        pg.fill("input[name=password]", ctl.creds["viewer"])
        pg.click("button[type=submit]")
        expect(pg).to_have_url(f"{ctl.url}/shops/shop-a")
        yield pg, requests, errors


def hover_legend(pg: Page, figure: str) -> str:
    """Move the mouse over the plot of ``figure`` and return its legend's text."""
    pg.locator(f"{figure} .u-over").hover()
    return pg.locator(f"{figure} .u-legend").inner_text()


def test_fridge_chart_has_axes_and_hover_values_from_vendored_uplot(page, fleet):
    pg, requests, errors = page
    fig = 'figure[data-series="temperature_c"]'
    expect(pg.locator(fig)).to_have_attribute("data-state", "drawn")
    expect(pg.locator(f"{fig} .u-axis")).to_have_count(2)  # time and value axes
    # uPlot draws the axes on the canvas: ask the plot what it drew (labels, tick texts, size).
    drawn = pg.evaluate("""(sel) => { const u = document.querySelector(sel).uplot;
        return { label: u.axes[1].label, x: u.axes[0]._values, y: u.axes[1]._values, time: u.scales.x.time,
                 width: u.ctx.canvas.width, span: u.scales.x.max - u.scales.x.min }; }""", fig)
    assert drawn["label"] == "C" and drawn["time"] is True and drawn["width"] > 200
    assert 3590 <= drawn["span"] <= 3610, drawn  # the time axis spans the hour asked for
    assert len(drawn["x"]) >= 2 and all(v.strip() for v in drawn["x"]), drawn  # time ticks with text
    assert len(drawn["y"]) >= 2, drawn
    legend = hover_legend(pg, fig)
    assert "fridge-1" in legend and "4.1 C" in legend, legend
    # The library came from the controller, not a CDN; nothing else was fetched from elsewhere.
    ctl, _ = fleet
    assert any(u.endswith("/static/vendor/uplot/uPlot.iife.min.js") for u in requests)
    assert all(u.startswith(ctl.url) or u.startswith("data:") for u in requests), [u for u in requests if not u.startswith(ctl.url)]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pg.locator("#charts").screenshot(path=str(SCREENSHOTS / "charts.png"))
    assert errors == []


def test_shop_charts_fps_occupancy_total_and_weights(page):
    pg, _requests, errors = page
    fps = 'figure[data-series="fps"]'
    expect(pg.locator(fps)).to_have_attribute("data-state", "drawn")
    assert "cam-entrance" in hover_legend(pg, fps) and "14.8" in hover_legend(pg, fps)
    occ = 'figure[data-series="occupancy"]'
    expect(pg.locator(occ)).to_have_attribute("data-state", "drawn")
    assert "total" in hover_legend(pg, occ)
    weights = 'figure[data-series="shelf_weight_g"]'
    expect(pg.locator(weights)).to_have_attribute("data-state", "drawn")
    assert "shelf-1/slot-1" in hover_legend(pg, weights) and "1520 g" in hover_legend(pg, weights)
    assert errors == []


def test_node_charts_and_cpu_falls_back_to_load(page):
    pg, _requests, errors = page
    mem = 'figure[data-series="mem_used_percent"][data-node="pi-1"]'
    expect(pg.locator(mem)).to_have_attribute("data-state", "drawn")
    assert "37.5 %" in hover_legend(pg, mem)  # 5 GiB free of 8
    cpu = 'figure[data-series="cpu_percent"][data-node="pi-1"]'
    expect(pg.locator(cpu)).to_have_attribute("data-state", "drawn")
    expect(pg.locator(f"{cpu} [data-chart-shows]")).to_have_text("cpu_load_1m")  # these nodes send no CPU percent
    # No temperature sensor: the chart says so rather than drawing zeros.
    temp = 'figure[data-series="cpu_temp_c"][data-node="pi-1"]'
    expect(pg.locator(temp)).to_have_attribute("data-state", "empty")
    expect(pg.locator(temp)).to_contain_text("No samples")
    assert errors == []


def test_seven_day_range_reads_the_minute_rollup(page, fleet):
    pg, _requests, errors = page
    ctl, _ = fleet
    ctl.call(ctl.service.writer.call("retention", ctl.service.settings.retention))  # fold the samples into the rollups now
    fig = 'figure[data-series="temperature_c"]'
    pg.click('[data-chart-range="604800"]')
    expect(pg.locator('[data-chart-range="604800"]')).to_have_attribute("aria-pressed", "true")
    expect(pg.locator(fig)).to_have_attribute("data-resolution", "1m")
    expect(pg.locator(fig)).to_have_attribute("data-state", "drawn")
    assert "4.1 C" in hover_legend(pg, fig)
    pg.click('[data-chart-range="3600"]')
    expect(pg.locator(fig)).to_have_attribute("data-resolution", "raw")
    assert errors == []

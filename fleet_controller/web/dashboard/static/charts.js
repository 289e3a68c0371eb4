// shopfleet charts over time: draws every <figure data-series> inside [data-charts-shop] with the
// vendored uPlot (/static/vendor/uplot/, no CDN), from GET /api/v1/shops/{shop}/series.
// Axes with units, a range picker (1 h / 24 h / 7 d) and hover values (mean, and the bucket's
// min-max when it holds several samples) in the legend. No inline script: templates/_charts.html
// only marks up the figures, this file finds them.
//
// Each figure says what it shows through data attributes: data-series (the series name),
// data-node, data-source (narrow it down), data-total="true" (add the shop's total line),
// data-fallback (a series to show when the first one has no samples, e.g. load when a node
// reports no CPU percent). The figure's data-state ("loading", "drawn", "empty", "error") tells
// tests and screen readers where it stands.
"use strict";
(function () {
  const root = document.querySelector("[data-charts-shop]");
  if (!root || typeof window.uPlot !== "function") return;
  const shop = root.dataset.chartsShop;
  const COLORS = ["#1f6feb", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"];
  const REFRESH_S = { 3600: 30, 86400: 120, 604800: 600 };
  let range = Number((root.querySelector("[data-chart-range][aria-pressed=true]") || {}).dataset?.chartRange || 3600);
  const plots = new Map(); // figure -> uPlot
  let timer = null;

  function css(name, fallback) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
  }

  function fmt(v, unit) {
    if (v == null || Number.isNaN(v)) return "\u2013";
    const a = Math.abs(v);
    const s = a >= 1000 ? v.toFixed(0) : String(Number(v.toPrecision(3))); // 3 significant digits, no trailing zeros
    return unit ? `${s} ${unit}` : s;
  }

  function lineLabel(line, lines) {
    const nodes = new Set(lines.map((l) => l.node));
    if (line.source === "total") return "total";
    if (!line.source) return line.node;
    return nodes.size > 1 ? `${line.source} (${line.node})` : line.source;
  }

  async function load(name, fig) {
    const now = Date.now() / 1000;
    const q = new URLSearchParams({ name, from: String(Math.floor(now - range)), to: String(Math.ceil(now)) });
    if (fig.dataset.node) q.set("node", fig.dataset.node);
    if (fig.dataset.source) q.set("source", fig.dataset.source);
    if (fig.dataset.total === "true") q.set("total", "true");
    const r = await fetch(`/api/v1/shops/${encodeURIComponent(shop)}/series?${q}`,
      { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); throw new Error("logged out"); }
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error((body && body.detail) || `HTTP ${r.status}`);
    return body;
  }

  function message(fig, state, text) {
    const plot = plots.get(fig);
    if (plot) { plot.destroy(); plots.delete(fig); fig.uplot = null; }
    const box = fig.querySelector(".chart-plot");
    box.textContent = "";
    const p = document.createElement("p");
    p.className = state === "error" ? "chart-msg bad" : "chart-msg muted";
    p.textContent = text;
    box.appendChild(p);
    fig.dataset.state = state;
  }

  function draw(fig, data) {
    const box = fig.querySelector(".chart-plot");
    const unit = data.unit || "";
    const fg = css("--fg", "#1d232b"), grid = css("--line", "#dde1e6");
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid, width: 1 } };
    const series = [{ label: "time", value: (u, v) => (v == null ? "\u2013" : new Date(v * 1000).toLocaleString()) }];
    data.lines.forEach((line, i) => {
      series.push({
        label: lineLabel(line, data.lines),
        stroke: line.source === "total" ? fg : COLORS[i % COLORS.length],
        width: line.source === "total" ? 2 : 1.5,
        dash: line.source === "total" ? [6, 4] : undefined,
        spanGaps: false,
        points: { show: data.times.length < 80 },
        // Hover value: the bucket's mean, with its min-max when they differ (several samples).
        value: (u, v, si, di) => {
          if (v == null || di == null) return "\u2013";
          const lo = line.min[di], hi = line.max[di];
          return lo != null && hi != null && hi - lo > 1e-9 ? `${fmt(v, unit)} (${fmt(lo)}\u2013${fmt(hi)})` : fmt(v, unit);
        },
      });
    });
    const opts = {
      width: Math.max(box.clientWidth, 240),
      height: 180,
      series,
      // The time axis spans the range asked for, not just the samples (one sample must not stretch it over years).
      scales: { x: { time: true, range: () => [data.start, data.end] } },
      axes: [
        { ...axis },
        { ...axis, label: unit, size: 56, values: (u, ticks) => ticks.map((t) => fmt(t)) },
      ],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } }, // the range buttons choose the span; no zoom to undo
    };
    const values = [data.times, ...data.lines.map((l) => l.mean)];
    const old = plots.get(fig);
    if (old) old.destroy();
    box.textContent = "";
    const plot = new window.uPlot(opts, values, box);
    plots.set(fig, plot);
    fig.uplot = plot; // for the browser tests and the console: axes and tick labels live on the canvas
    fig.dataset.state = "drawn";
    fig.dataset.resolution = data.resolution;
  }

  async function render(fig) {
    if (!plots.has(fig)) fig.dataset.state = "loading";
    try {
      let data = await load(fig.dataset.series, fig);
      let shown = fig.dataset.series;
      if (!data.lines.length && fig.dataset.fallback) {
        data = await load(fig.dataset.fallback, fig);
        shown = fig.dataset.fallback;
      }
      const cap = fig.querySelector("[data-chart-shows]");
      if (cap) cap.textContent = shown;
      if (!data.lines.length) message(fig, "empty", "No samples in this range.");
      else draw(fig, data);
    } catch (e) {
      message(fig, "error", `Cannot load this chart: ${e.message}`);
    }
  }

  function renderAll() {
    const figs = [...root.querySelectorAll("figure[data-series]")];
    return Promise.all(figs.map(render)).finally(() => {
      clearTimeout(timer);
      timer = setTimeout(renderAll, (REFRESH_S[range] || 60) * 1000);
    });
  }

  root.querySelectorAll("[data-chart-range]").forEach((b) => {
    b.addEventListener("click", () => {
      range = Number(b.dataset.chartRange);
      root.querySelectorAll("[data-chart-range]").forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
      renderAll();
    });
  });

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      for (const [fig, plot] of plots) {
        plot.setSize({ width: Math.max(fig.querySelector(".chart-plot").clientWidth, 240), height: 180 });
      }
    }, 150);
  });

  renderAll();
})();

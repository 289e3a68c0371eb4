// shopfleet dashboard: live updates (server-sent events), the connection watchdog and the buttons.
// No framework, no CDN, no inline script (the controller's CSP forbids it). The server renders
// every page; this script refreshes the parts marked data-live-region from a fresh render, so a
// refreshed value is exactly what a reload would show, and says plainly when it cannot.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const page = document.body.dataset.page || "";
  // The server sends a ping every PING_S seconds; no message for WATCHDOG_MS means the controller
  // is gone (a refused connection can leave EventSource silently retrying for a long time).
  const WATCHDOG_MS = 5000, RECONNECT_MS = 2000, RESYNC_MS = 5000;

  function toast(msg) {
    let t = document.getElementById("toast");
    if (!t) { t = document.createElement("div"); t.id = "toast"; t.className = "toast"; t.setAttribute("role", "status");
      document.body.appendChild(t); }
    t.textContent = msg; t.hidden = false;
    clearTimeout(t._h); t._h = setTimeout(() => { t.hidden = true; }, 6000);
  }

  class Unreachable extends Error {}

  async function api(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    let r;
    try { r = await fetch(url, opts); } catch (e) {
      setDisconnected();
      throw new Unreachable("the controller cannot be reached; nothing was sent. Try again when the page says live");
    }
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); throw new Error("logged out"); }
    const data = r.headers.get("content-type") && r.headers.get("content-type").includes("json") ? await r.json() : null;
    if (!r.ok) { const err = new Error((data && data.detail) || ("HTTP " + r.status)); err.status = r.status; throw err; }
    return data;
  }

  // ----- relative times that tick -------------------------------------------------------------
  function ago(ts) {
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s >= 86400) return Math.round(s / 86400) + " d ago";
    if (s >= 3600) return Math.round(s / 3600) + " h ago";
    if (s >= 60) return Math.round(s / 60) + " min ago";
    return Math.round(s) + " s ago";
  }
  function tickAges() {
    for (const el of document.querySelectorAll("[data-ts]")) {
      const ts = parseFloat(el.dataset.ts);
      if (!isNaN(ts)) el.textContent = ago(ts);
    }
  }
  setInterval(tickAges, 1000);

  // ----- connection state ---------------------------------------------------------------------
  let connected = false, lastMessage = 0, lastSync = Date.now(), es = null, reconnectTimer = null;
  const clock = (t) => new Date(t).toLocaleTimeString();

  function showState() {
    const live = document.getElementById("live"), text = document.getElementById("live-text");
    const banner = document.getElementById("stale-banner"), main = document.getElementById("main");
    if (live) { live.className = connected ? "live on" : "live off"; live.title = connected ? "live updates on" : "disconnected: values are stale"; }
    if (text) text.textContent = connected ? "live" : (lastMessage ? "disconnected" : "connecting…");
    if (main) main.classList.toggle("stale", !connected && lastMessage > 0);
    document.body.dataset.connection = connected ? "live" : (lastMessage ? "disconnected" : "connecting");
    if (banner) {
      banner.hidden = connected || !lastMessage;
      const since = document.getElementById("stale-since"), upd = document.getElementById("stale-updated");
      if (since && !connected) since.textContent = clock(lastMessage);
      if (upd && !connected) upd.textContent = clock(lastSync);
    }
  }

  function setDisconnected() {
    if (!connected && es === null) return;
    connected = false;
    if (es) { es.close(); es = null; }
    showState();
    clearTimeout(reconnectTimer);
    reconnectTimer = setTimeout(connect, RECONNECT_MS);
  }

  function heard() {
    lastMessage = Date.now();
    if (!connected) {
      const wasLost = document.body.dataset.connection === "disconnected";
      connected = true;
      showState();
      if (wasLost) resync();  // what changed while we were away: fetch it all again
    }
  }

  setInterval(() => {
    if (connected && Date.now() - lastMessage > WATCHDOG_MS) setDisconnected();
    else if (!connected && es && lastMessage && Date.now() - lastMessage > WATCHDOG_MS) setDisconnected();
  }, 1000);

  // ----- refreshing the page from a fresh render -----------------------------------------------
  async function refreshRegions() {
    if (!document.querySelector("[data-live-region]")) return;
    let r;
    try { r = await fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } }); }
    catch (e) { setDisconnected(); return; }
    if (r.redirected && r.url.includes("/login")) { location.href = r.url; return; }
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    for (const old of document.querySelectorAll("[data-live-region]")) {
      const fresh = doc.querySelector(`[data-live-region="${CSS.escape(old.dataset.liveRegion)}"]`);
      if (fresh && old.innerHTML !== fresh.innerHTML) old.replaceWith(document.importNode(fresh, true));
    }
    lastSync = Date.now();
    tickAges();
    document.dispatchEvent(new CustomEvent("shopfleet:refreshed"));  // for other scripts on the page
  }

  let pending = null;
  function refreshSoon() {  // at most one refresh a second, whatever the event rate
    if (pending) return;
    pending = setTimeout(() => { pending = null; refreshRegions(); }, 1000);
  }

  function resync() {
    updateAlertCount();
    if (page === "rollouts") loadRollouts(); else refreshRegions();
  }

  // Values without a live event of their own (fps, readings, last seen) come with the periodic
  // resync; a hidden tab skips it and catches up when shown again.
  setInterval(() => { if (connected && !document.hidden) resync(); }, RESYNC_MS);
  document.addEventListener("visibilitychange", () => { if (!document.hidden && connected) resync(); });

  async function updateAlertCount() {
    try {
      const alerts = await api("GET", "/api/v1/alerts?state=firing");
      const open = alerts.filter(a => a.status === "firing").length;
      const el = document.getElementById("alert-count");
      if (el) el.textContent = open ? String(open) : "";
    } catch (e) { /* the count is a hint; the banner says when the page is stale */ }
  }

  function setBadge(el, state) {
    el.textContent = state;
    el.className = el.className.replace(/\bstate-\S+/, "state-" + state);
  }

  function onMessage(topic, data) {
    const shop = document.body.dataset.shop;
    if (topic === "presence") {
      const el = document.querySelector(`[data-node-badge="${CSS.escape(data.shop + "/" + data.node)}"]`);
      if (el) setBadge(el, data.new);
    }
    if (topic === "alert_changed") updateAlertCount();
    if (page === "fleet" && ["presence", "alert_changed", "node_added", "shop_added", "reported_state"].includes(topic)) refreshSoon();
    else if (page === "shop" && data.shop === shop) refreshSoon();
    else if (page === "alerts" && ["alert_changed", "alert"].includes(topic)) refreshSoon();
  }

  const TOPICS = ["presence", "event", "alert", "alert_changed", "node_added", "shop_added", "reported_state"];
  function connect() {
    clearTimeout(reconnectTimer);
    if (!window.EventSource) return;
    if (es) es.close();
    es = new EventSource("/api/v1/live");
    const mine = es;
    es.addEventListener("ping", () => { if (es === mine) heard(); });
    es.onerror = () => { if (es === mine && connected) setDisconnected(); };
    for (const topic of TOPICS) {
      es.addEventListener(topic, (m) => {
        if (es !== mine) return;
        heard();
        try { onMessage(topic, JSON.parse(m.data)); } catch (e) { /* a bad message must not stop the stream */ }
      });
    }
    // No ping within the watchdog after (re)connecting counts as still disconnected.
    setTimeout(() => { if (es === mine && !connected) { lastMessage = lastMessage || Date.now() - WATCHDOG_MS; setDisconnected(); } }, WATCHDOG_MS);
  }
  window.addEventListener("pagehide", () => { if (es) es.close(); });

  // ----- confirmation of destructive actions ---------------------------------------------------
  // The dialog shows the scope the server computed; the server acts only with that scope's token
  // and refuses if the scope changed since (see the rollout API).
  function confirmDialog(title, scope, shops, okLabel) {
    const dlg = document.getElementById("confirm-dialog");
    if (!dlg || !dlg.showModal) return Promise.resolve(null);
    document.getElementById("confirm-title").textContent = title;
    document.getElementById("confirm-scope").textContent = scope;
    const ul = document.getElementById("confirm-shops");
    ul.replaceChildren(...shops.slice(0, 50).map(s => text("li", s)));
    if (shops.length > 50) ul.append(text("li", `… and ${shops.length - 50} more`, "muted"));
    document.getElementById("confirm-ok").textContent = okLabel;
    document.getElementById("confirm-reason").value = "";
    return new Promise((resolve) => {
      dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok" ? document.getElementById("confirm-reason").value : null), { once: true });
      dlg.returnValue = "";
      dlg.showModal();
      document.getElementById("confirm-cancel").focus();
    });
  }

  async function rolloutAction(id, action) {
    if (action === "pause" || action === "resume") { await api("POST", `/api/v1/rollouts/${id}/${action}`, {}); return true; }
    const scope = await api("GET", `/api/v1/rollouts/${id}/${action}/scope`);
    const shops = action === "rollback" ? (scope.rollback || []).map(s => `${s.shop} → ${s.to || "(no previous release)"}`)
      : (scope.skip || []).map(s => `${s} (not started)`);
    const label = action === "rollback" ? `Roll back ${(scope.rollback || []).length} shops` : `Abort: skip ${(scope.skip || []).length} shops`;
    const reason = await confirmDialog(action === "rollback" ? "Roll back?" : "Abort?", scope.scope, shops, label);
    if (reason === null) return false;
    await api("POST", `/api/v1/rollouts/${id}/${action}`, { confirm: scope.token, reason });
    return true;
  }

  document.addEventListener("click", async (e) => {
    const btn = e.target.closest("button[data-action]");
    if (!btn) return;
    btn.disabled = true;
    const id = btn.dataset.id, action = btn.dataset.action;
    try {
      if (action.startsWith("rollout-")) {
        if (await rolloutAction(id, action.slice(8))) toast(`Rollout #${id}: ${action.slice(8)} requested`);
        await loadRollouts();
        btn.disabled = false;
        return;
      }
      let done = "Acknowledged";
      if (action === "ack") await api("POST", `/api/v1/alerts/${id}/ack`);
      else if (action === "silence") {
        // The row's own choice of duration and comment (silences are listed, and undone, at /alerts/silences).
        const form = btn.closest(".silence-form");
        const select = form && form.querySelector("[data-silence-duration]");
        const duration = select ? Number(select.value) : 3600;
        const comment = form ? (form.querySelector("[data-silence-comment]").value || "").trim() : "";
        await api("POST", `/api/v1/alerts/${id}/silence`, { duration_s: duration, comment });
        done = `Silenced for ${select ? select.selectedOptions[0].textContent : "1 h"}`;
      }
      toast(done);
      await refreshRegions();
      updateAlertCount();
    } catch (err) {
      toast((err instanceof Unreachable ? "Not sent: " : "Failed: ") + err.message);
      btn.disabled = false;
    }
  });

  // ----- rollouts page: filled from the rollout API (/api/v1/rollouts, /api/v1/releases);
  // the buttons exist only for roles that may use them (the server refuses the others anyway).
  const ALLOWED = { pause: ["running"], resume: ["paused"], abort: ["running", "paused"],
                    rollback: ["running", "paused", "completed", "failed", "aborted", "expired"] };
  function text(tag, s, cls) { const el = document.createElement(tag); el.textContent = s; if (cls) el.className = cls; return el; }
  const num = (v) => (v === null || v === undefined) ? "–" : (Math.abs(v) >= 100 ? v.toFixed(0) : Number(v.toPrecision(3)).toString());
  function failureText(f) {
    const measured = f.value !== null && f.value !== undefined ? ` (measured ${num(f.value)}, threshold ${num(f.threshold)})` : "";
    return `${f.shop}: gate ${f.gate}: ${f.reason.replace(/^gate \S+: /, "")}${measured}`;
  }
  function rolloutCard(r, canAct) {
    const art = document.createElement("article"); art.className = "rollout"; art.dataset.rollout = r.id; art.id = "rollout-" + r.id;
    art.append(text("h3", `#${r.id} ${r.release}`),
               text("p", `state: ${r.status}${r.reason ? " (" + r.reason + ")" : ""}`, "muted"));
    if (r.failure) {
      const p = text("p", "", "failure"); p.dataset.field = "failure";
      p.append(text("b", "Failed check: "), document.createTextNode(failureText(r.failure)));
      art.append(p);
    }
    for (const w of (r.waves || [])) {
      const div = document.createElement("div"); div.className = "wave";
      const states = Object.entries(w.states || {}).map(([k, v]) => `${v} ${k}`).join(", ");
      div.append(text("span", `wave ${w.index} ${w.name || ""}${w.index === r.current_wave ? " (current)" : ""}: ${w.done}/${w.shops} done${states ? " · " + states : ""}`));
      const bar = document.createElement("div"); bar.className = "bar"; const fill = document.createElement("span");
      fill.style.width = (w.shops ? Math.round(100 * w.done / w.shops) : 0) + "%"; bar.append(fill); div.append(bar);
      art.append(div);
    }
    if ((r.gate_failures || []).length) {
      art.append(text("h4", "Gate failures"));
      const ul = document.createElement("ul"); ul.className = "gate-failures";
      for (const f of r.gate_failures) ul.append(text("li", failureText(f), "bad"));
      art.append(ul);
    }
    if ((r.problem_shops || []).length) {
      art.append(text("h4", "Shops not done"));
      const ul = document.createElement("ul"); ul.className = "problem-shops";
      for (const p of r.problem_shops) ul.append(text("li", `${p.shop}: ${p.reason}`));
      art.append(ul);
    }
    if ((r.events || []).length) {
      const ol = document.createElement("ol"); ol.className = "feed";
      for (const e of r.events.slice(-8).reverse()) ol.append(text("li", `${new Date(e.at * 1000).toISOString().slice(11, 19)} ${e.kind}${e.shop ? " " + e.shop : ""}: ${e.message}`));
      art.append(ol);
    }
    if (canAct) {
      const actions = document.createElement("p"); actions.className = "actions";
      for (const a of Object.keys(ALLOWED)) {
        if (!ALLOWED[a].includes(r.status)) continue;
        const b = text("button", a[0].toUpperCase() + a.slice(1) + "…".repeat(a === "abort" || a === "rollback" ? 1 : 0),
                       a === "abort" || a === "rollback" ? "secondary danger" : "");
        b.type = "button"; b.dataset.action = "rollout-" + a; b.dataset.id = r.id; actions.append(b);
      }
      art.append(actions);
    }
    return art;
  }
  let releasesLoaded = false;
  async function loadRollouts() {
    const box = document.getElementById("rollouts");
    if (!box || document.body.dataset.rolloutsApi !== "yes") return;
    const canAct = document.body.dataset.canRollout === "yes";
    try {
      const list = await api("GET", "/api/v1/rollouts?limit=10");
      const details = await Promise.all(list.map(r => api("GET", `/api/v1/rollouts/${r.id}`)));
      const cards = details.map(r => rolloutCard(r, canAct));
      box.replaceChildren(...(cards.length ? cards : [text("p", "No rollout yet.", "empty")]));
      const rel = document.getElementById("releases");
      const releases = await api("GET", "/api/v1/releases");
      if (rel) rel.replaceChildren(...(releases.length ? releases.slice(0, 20).map(x => text("li", `${x.name} (version ${x.version})`)) : [text("li", "No release yet.", "empty")]));
      const sel = document.getElementById("rollout-release");
      if (sel && !releasesLoaded) {
        releasesLoaded = true;
        sel.replaceChildren(text("option", releases.length ? "Pick a release" : "No release yet: create one with 'shopfleet release create'"),
                            ...releases.map(x => { const o = text("option", `${x.name} (version ${x.version})`); o.value = x.name; return o; }));
        sel.firstChild.value = "";
      }
      lastSync = Date.now();
    } catch (e) {
      if (!(e instanceof Unreachable)) box.prepend(text("p", "Cannot load rollouts: " + e.message, "error"));
    }
  }

  // ----- starting a rollout: form -> preview (the planner's waves, shops, windows) -> confirm ---
  const list = (s) => (s || "").split(",").map(x => x.trim()).filter(Boolean);
  function policyFromForm(f) {
    const labels = {};
    for (const kv of list(f.labels.value)) {
      const i = kv.indexOf("=");
      if (i < 1) throw new Error(`target label "${kv}" is not key=value`);
      labels[kv.slice(0, i).trim()] = kv.slice(i + 1).trim();
    }
    const waves = [];
    if (list(f.canary.value).length) waves.push({ name: "canary", shops: list(f.canary.value) });
    const percents = list(f.percents.value).map(Number);
    if (percents.some(p => !(p > 0 && p <= 100))) throw new Error("wave percentages must be numbers from 1 to 100, e.g. 10, 50, 100");
    percents.forEach((p, i) => waves.push({ name: i === percents.length - 1 ? "all" : `wave-${p}%`, percent: p }));
    const local = list(f.windows.value).map((w) => {
      const m = w.match(/^(\d\d:\d\d)\s*-\s*(\d\d:\d\d)$/);
      if (!m) throw new Error(`window "${w}" is not HH:MM-HH:MM`);
      return { start: m[1], end: m[2] };
    });
    return {
      target: { labels, regions: list(f.regions.value), exclude: list(f.exclude.value) },
      waves, windows: { local, idle: f.idle.checked ? {} : null },
      bake_time_s: Number(f.bake_min.value || 0) * 60, max_in_flight: Number(f.max_in_flight.value || 1),
    };
  }

  function renderPreview(box, release, policy, p) {
    const out = [text("h3", `Plan: ${release} to ${p.shops} shop${p.shops === 1 ? "" : "s"} in ${p.waves.length} wave${p.waves.length === 1 ? "" : "s"}`)];
    out.push(text("p", `Windows: ${p.windows.summary} · at most ${p.max_in_flight} shops at once · bake ${Math.round(p.bake_time_s / 60)} min each · gates: fps ≥ ${p.gates.min_fps ?? "off"}, errors ≤ ${p.gates.max_errors_per_minute ?? "off"}/min, nodes online ≥ ${Math.round(p.gates.min_nodes_online * 100)}%`, "muted"));
    const table = document.createElement("table"); table.className = "plan";
    const head = document.createElement("tr"); for (const h of ["Wave", "Shops"]) head.append(text("th", h));
    const thead = document.createElement("thead"); thead.append(head); table.append(thead);
    const body = document.createElement("tbody");
    for (const w of p.waves) {
      const tr = document.createElement("tr"); tr.dataset.wave = w.name;
      const td1 = text("td", `${w.index + 1}. ${w.name} (${w.shops.length})`); td1.dataset.label = "Wave";
      const td2 = text("td", w.shops.map(s => `${s.id}${s.region ? " · " + s.region : ""} (${s.timezone}, now ${s.from_release || "no release"})`).join("; "));
      td2.dataset.label = "Shops";
      tr.append(td1, td2); body.append(tr);
    }
    table.append(body); out.push(table);
    if (p.skipped.length) out.push(text("p", "Not included: " + p.skipped.map(s => `${s.shop} (${s.reason})`).join("; "), "muted"));
    for (const problem of p.problems) out.push(text("p", "Cannot start: " + problem, "error"));
    const actions = document.createElement("p"); actions.className = "actions";
    const go = text("button", `Start rollout of ${release} to ${p.shops} shops`); go.type = "button"; go.id = "rollout-start";
    go.disabled = p.problems.length > 0;
    const cancel = text("button", "Cancel", "secondary"); cancel.type = "button";
    cancel.addEventListener("click", () => box.replaceChildren());
    go.addEventListener("click", async () => {
      go.disabled = true;
      try {
        const r = await api("POST", "/api/v1/rollouts", { release, policy, confirm: p.token });
        toast(`Rollout #${r.id} of ${release} started`);
        box.replaceChildren();
        document.getElementById("new-rollout").open = false;
        await loadRollouts();
      } catch (e) {
        box.append(text("p", (e.status === 409 ? "Not started: " : "Failed: ") + e.message, "error"));
        if (e.status === 409) { const again = await api("POST", "/api/v1/rollouts/preview", { release, policy }).catch(() => null); if (again) renderPreview(box, release, policy, again); }
      }
    });
    actions.append(go, document.createTextNode(" "), cancel); out.push(actions);
    box.replaceChildren(...out);
  }

  const form = document.getElementById("rollout-form");
  if (form) form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const box = document.getElementById("rollout-preview");
    const release = form.release.value;
    try {
      if (!release) throw new Error("pick a release first");
      const policy = policyFromForm(form);
      renderPreview(box, release, policy, await api("POST", "/api/v1/rollouts/preview", { release, policy }));
    } catch (err) { box.replaceChildren(text("p", "Cannot preview: " + err.message, "error")); }
  });

  tickAges();
  showState();
  updateAlertCount();
  connect();
  if (page === "rollouts") loadRollouts();
})();

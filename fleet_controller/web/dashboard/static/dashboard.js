// shopfleet dashboard: live updates (server-sent events) and the buttons. No framework, no CDN.
// The server renders every page; this script only refreshes parts of it and sends actions
// with the session's CSRF token.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const page = document.body.dataset.page || "";

  function toast(msg) {
    let t = document.getElementById("toast");
    if (!t) { t = document.createElement("div"); t.id = "toast"; t.setAttribute("role", "status");
      t.style.cssText = "position:fixed;bottom:1rem;left:50%;transform:translateX(-50%);background:#24292f;color:#fff;padding:.5rem 1rem;border-radius:6px";
      document.body.appendChild(t); }
    t.textContent = msg; t.hidden = false;
    clearTimeout(t._h); t._h = setTimeout(() => { t.hidden = true; }, 4000);
  }

  async function api(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "Accept": "application/json" } };
    if (method !== "GET") opts.headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    const r = await fetch(url, opts);
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); throw new Error("logged out"); }
    const data = r.headers.get("content-type") && r.headers.get("content-type").includes("json") ? await r.json() : null;
    if (!r.ok) throw new Error((data && data.detail) || ("HTTP " + r.status));
    return data;
  }

  // Replace the parts of the page marked by `selectors` with the same parts of a fresh render.
  async function refresh(selectors) {
    const r = await fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } });
    if (!r.ok) return;
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    for (const sel of selectors) {
      const fresh = doc.querySelector(sel), old = document.querySelector(sel);
      if (fresh && old) old.replaceWith(fresh);
    }
    tickAges();
  }

  let pending = null;
  function refreshSoon(selectors) {  // at most one refresh a second, whatever the event rate
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh(selectors).catch(() => {}); }, 1000);
  }

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
  setInterval(tickAges, 10000);

  async function updateAlertCount() {
    try {
      const alerts = await api("GET", "/api/v1/alerts?state=firing");
      const open = alerts.filter(a => a.status === "firing").length;
      const el = document.getElementById("alert-count");
      if (el) el.textContent = open ? String(open) : "";
    } catch (e) { /* the count is a hint; the alerts page has the truth */ }
  }

  function setBadge(el, state) {
    el.textContent = state;
    el.className = el.className.replace(/\bstate-\S+/, "state-" + state);
  }

  function addFeed(ev) {
    const feed = document.getElementById("feed");
    if (!feed) return;
    const empty = feed.querySelector(".empty"); if (empty) empty.remove();
    const li = document.createElement("li");
    const t = document.createElement("time"); t.textContent = new Date((ev.received_at || ev.at || Date.now() / 1000) * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
    const b = document.createElement("b"); b.textContent = " " + (ev.kind || ev.topic || "") + " ";
    const small = document.createElement("small"); small.textContent = (ev.node || "") + (ev.source ? " · " + ev.source : "");
    li.append(t, b, document.createTextNode((ev.type || ev.new || "") + " "), small, document.createTextNode(" " + (ev.message || "")));
    feed.prepend(li);
    while (feed.children.length > 200) feed.lastElementChild.remove();
  }

  function onMessage(topic, data) {
    const shop = document.body.dataset.shop;
    if (topic === "presence") {
      const el = document.querySelector(`[data-node-badge="${CSS.escape(data.shop + "/" + data.node)}"]`);
      if (el) setBadge(el, data.new);
      if (shop && data.shop === shop) addFeed({ kind: "presence", type: data.new, node: data.node, message: data.reason || "", at: data.at });
    } else if ((topic === "event" || topic === "alert") && shop && data.shop === shop) {
      addFeed(data);
    } else if (topic === "alert_changed") {
      updateAlertCount();
      if (page === "alerts") refreshSoon(["main"]);
      if (page === "shop" && data.shop === shop) refreshSoon(["#alerts"]);
    }
    if (page === "fleet" && ["presence", "alert_changed", "node_added", "shop_added", "reported_state"].includes(topic)) {
      refreshSoon(["#fleet-table", "#state-counts"]);
    }
  }

  function connect() {
    if (!window.EventSource) return;
    const live = document.getElementById("live");
    const es = new EventSource("/api/v1/live");
    es.onopen = () => { if (live) { live.classList.add("on"); live.title = "live updates on"; } };
    es.onerror = () => { if (live) { live.classList.remove("on"); live.title = "reconnecting…"; } };
    for (const topic of ["presence", "event", "alert", "alert_changed", "node_added", "shop_added", "reported_state"]) {
      es.addEventListener(topic, (m) => { try { onMessage(topic, JSON.parse(m.data)); } catch (e) { /* a bad message must not stop the stream */ } });
    }
    window.addEventListener("pagehide", () => es.close());
  }

  document.addEventListener("click", async (e) => {
    const btn = e.target.closest("button[data-action]");
    if (!btn) return;
    btn.disabled = true;
    const id = btn.dataset.id, action = btn.dataset.action;
    try {
      if (action === "ack") await api("POST", `/api/v1/alerts/${id}/ack`);
      else if (action === "silence") await api("POST", `/api/v1/alerts/${id}/silence`, { duration_s: 3600 });
      else if (action.startsWith("rollout-")) { await api("POST", `/api/v1/rollouts/${id}/${action.slice(8)}`); loadRollouts(); return; }
      toast(action === "ack" ? "Acknowledged" : "Silenced for 1 h");
      await refresh(page === "alerts" ? ["main"] : ["#alerts"]);
      updateAlertCount();
    } catch (err) {
      toast("Failed: " + err.message);
      btn.disabled = false;
    }
  });

  // ----- rollouts page: filled from the rollout API (/api/v1/rollouts, /api/v1/releases);
  // the buttons exist only for roles that may use them (the server refuses the others anyway).
  const ALLOWED = { pause: ["running"], resume: ["paused"], abort: ["running", "paused"],
                    rollback: ["running", "paused", "completed", "failed", "aborted", "expired"] };
  function text(tag, s, cls) { const el = document.createElement(tag); el.textContent = s; if (cls) el.className = cls; return el; }
  function rolloutCard(r, canAct) {
    const art = document.createElement("article"); art.className = "rollout"; art.dataset.rollout = r.id;
    art.append(text("h3", `#${r.id} ${r.release}`),
               text("p", `state: ${r.status}${r.reason ? " (" + r.reason + ")" : ""}`, "muted"));
    for (const w of (r.waves || [])) {
      const div = document.createElement("div"); div.className = "wave";
      const states = Object.entries(w.states || {}).map(([k, v]) => `${v} ${k}`).join(", ");
      div.append(text("span", `wave ${w.index} ${w.name || ""}${w.index === r.current_wave ? " (current)" : ""}: ${w.done}/${w.shops} done${states ? " · " + states : ""}`));
      const bar = document.createElement("div"); bar.className = "bar"; const fill = document.createElement("span");
      fill.style.width = (w.shops ? Math.round(100 * w.done / w.shops) : 0) + "%"; bar.append(fill); div.append(bar);
      art.append(div);
    }
    if ((r.problem_shops || []).length) {
      art.append(text("h4", "Gate failures"));
      const ul = document.createElement("ul");
      for (const p of r.problem_shops) ul.append(text("li", `${p.shop}: ${p.reason}`, "bad"));
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
        const b = text("button", a[0].toUpperCase() + a.slice(1), a === "abort" || a === "rollback" ? "secondary" : "");
        b.type = "button"; b.dataset.action = "rollout-" + a; b.dataset.id = r.id; actions.append(b);
      }
      art.append(actions);
    }
    return art;
  }
  async function loadRollouts() {
    const box = document.getElementById("rollouts");
    if (!box) return;
    const canAct = document.body.dataset.canRollout === "yes";
    try {
      const list = await api("GET", "/api/v1/rollouts?limit=10");
      const details = await Promise.all(list.map(r => api("GET", `/api/v1/rollouts/${r.id}`)));
      const cards = details.map(r => rolloutCard(r, canAct));
      box.replaceChildren(...(cards.length ? cards : [text("p", "No rollout yet.", "empty")]));
      const rel = document.getElementById("releases");
      if (rel) {
        const releases = await api("GET", "/api/v1/releases");
        rel.replaceChildren(...(releases.length ? releases.slice(0, 20).map(x => text("li", `${x.name} (version ${x.version})`)) : [text("li", "No release yet.", "empty")]));
      }
    } catch (e) { box.replaceChildren(text("p", "Cannot load rollouts: " + e.message, "error")); }
  }

  tickAges();
  updateAlertCount();
  connect();
  if (page === "rollouts" && document.body.dataset.rolloutsApi === "yes") { loadRollouts(); setInterval(loadRollouts, 5000); }
})();

// shopfleet: the silences, history and channels pages (forms and buttons). No framework, no CDN.
// Every write sends the session's CSRF token; a refused request shows the server's reason.
"use strict";
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const msg = document.getElementById("ap-msg");

  function say(text, isError) {
    if (!msg) return;
    msg.textContent = text; msg.hidden = !text;
    msg.className = isError ? "error" : "muted";
  }

  async function api(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "Accept": "application/json", "X-CSRF-Token": csrf } };
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    let r;
    try { r = await fetch(url, opts); } catch (e) { throw new Error("the controller cannot be reached: " + e.message); }
    if (r.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search); throw new Error("logged out"); }
    const ct = r.headers.get("content-type") || "";
    const data = ct.includes("json") ? await r.json() : null;
    if (!r.ok) throw new Error((data && (typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail))) || ("HTTP " + r.status));
    return data;
  }

  async function act(fn, done) {
    try { const out = await fn(); if (done) done(out); else location.reload(); }
    catch (e) { say("Failed: " + e.message, true); }
  }

  const silenceForm = document.getElementById("silence-form");
  if (silenceForm) silenceForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(silenceForm);
    act(() => api("POST", "/api/v1/silences", { alert_id: Number(f.get("alert_id")), duration_s: Number(f.get("duration_s")),
                                                 comment: String(f.get("comment") || "") }));
  });

  const form = document.getElementById("channel-form");
  function showKind() {
    if (!form) return;
    const kind = form.elements.kind.value;
    for (const fs of form.querySelectorAll("fieldset[data-kinds]")) fs.hidden = !fs.dataset.kinds.split(" ").includes(kind);
  }
  if (form) {
    form.elements.kind.addEventListener("change", showKind);
    form.addEventListener("reset", () => { form.elements.id.value = ""; document.getElementById("channel-form-title").textContent = "Add a channel"; setTimeout(showKind); });
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const e = form.elements, kind = e.kind.value, editing = !!e.id.value;
      const list = (v) => String(v || "").split(",").map((x) => x.trim()).filter(Boolean);
      let config;
      if (kind === "email") {
        config = { host: e.host.value, port: Number(e.port.value), security: e.security.value, username: e.username.value,
                   from_addr: e.from_addr.value, to: list(e.to.value) };
        if (e.password.value || !editing) config.password = e.password.value;
      } else {
        config = { url: e.url.value };
        if (e.authorization.value) config.headers = { Authorization: e.authorization.value };
        else if (!editing) config.headers = {};
      }
      const body = { name: e.name.value, kind, config, severities: [...form.querySelectorAll("input[name=severities]:checked")].map((x) => x.value),
                     shops: list(e.shops.value), send_resolved: e.send_resolved.checked, enabled: e.enabled.checked };
      act(() => editing ? api("PUT", `/api/v1/alert-channels/${e.id.value}`, body) : api("POST", "/api/v1/alert-channels", body));
    });
    showKind();
  }

  document.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-ap]");
    if (!b) return;
    const what = b.dataset.ap;
    if (what === "expire") {
      act(() => api("POST", `/api/v1/silences/${b.dataset.id}/expire`));
    } else if (what === "delete") {
      if (!confirm(`Delete channel ${b.dataset.name}? It will get no more alerts.`)) return;
      act(() => api("DELETE", `/api/v1/alert-channels/${b.dataset.id}`));
    } else if (what === "test") {
      b.disabled = true; say("Sending a test message…", false);
      act(() => api("POST", `/api/v1/alert-channels/${b.dataset.id}/test`), (out) => {
        b.disabled = false;
        if (out.ok) { say("Test message delivered.", false); setTimeout(() => location.reload(), 800); }
        else say("Test failed: " + out.error, true);
      });
    } else if (what === "edit" && form) {
      const c = JSON.parse(b.dataset.channel), e = form.elements;
      form.reset();
      e.id.value = c.id; e.name.value = c.name; e.kind.value = c.kind;
      document.getElementById("channel-form-title").textContent = "Edit channel " + c.name;
      if (c.kind === "email") {
        e.host.value = c.config.host; e.port.value = c.config.port; e.security.value = c.config.security;
        e.username.value = c.config.username || ""; e.from_addr.value = c.config.from_addr; e.to.value = (c.config.to || []).join(", ");
      } else e.url.value = c.config.url;
      for (const cb of form.querySelectorAll("input[name=severities]")) cb.checked = c.severities.includes(cb.value);
      e.shops.value = c.shops.join(", "); e.send_resolved.checked = c.send_resolved; e.enabled.checked = c.enabled;
      showKind(); e.id.value = c.id;
      form.scrollIntoView();
    }
  });
})();

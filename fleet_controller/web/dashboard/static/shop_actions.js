// Remote actions on the shop page (templates/_shop_actions.html): confirm with the scope named,
// POST /api/v1/actions, then poll GET /api/v1/actions?shop=... while any action is pending, so
// each one shows pending -> ok / failed / expired with the agent's message. Admins also remove a
// retired node from here (DELETE /api/v1/shops/{shop}/nodes/{node}). No inline script.
"use strict";
(function () {
  var root = document.querySelector("[data-shop-actions]");
  if (!root) return;
  var shop = root.getAttribute("data-shop-actions");
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  var rows = root.querySelector("[data-action-rows]");
  var table = root.querySelector("table.remote-actions");
  var none = root.querySelector("[data-no-actions]");
  var banner = root.querySelector("[data-maintenance]");
  var errorBox = root.querySelector("[data-action-error]");
  var timer = null;

  function iso(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : ""; }
  function cell(text, cls) { var td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }
  function showError(msg) { if (!errorBox) return; errorBox.textContent = msg; errorBox.hidden = !msg; }

  function render(data) {
    var m = data.maintenance;
    banner.hidden = !m;
    if (m) banner.textContent = "In maintenance until " + iso(m.until) + " (by " + m.by + (m.reason ? ": " + m.reason : "") +
      "). Rollouts hold for this shop; its alerts are muted.";
    rows.textContent = "";
    var pending = false;
    data.actions.forEach(function (a) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-action-id", a.id);
      tr.appendChild(cell(a.action.replace(/_/g, " ")));
      tr.appendChild(cell(a.node ? a.node + (a.args.pipeline ? " · " + a.args.pipeline : "") : "shop" + (a.revision ? " · revision " + a.revision : "")));
      tr.appendChild(cell(a.requested_by));
      tr.appendChild(cell(iso(a.requested_at)));
      tr.appendChild(cell(a.status + (a.message ? ": " + a.message : ""), "action-status-" + a.status));
      tr.setAttribute("data-status", a.status);
      rows.appendChild(tr);
      if (a.status === "pending") pending = true;
    });
    table.hidden = data.actions.length === 0;
    none.hidden = data.actions.length !== 0;
    clearTimeout(timer);
    if (pending) timer = setTimeout(refresh, 2000);
  }

  function refresh() {
    fetch("/api/v1/actions?shop=" + encodeURIComponent(shop), { headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(render)
      .catch(function (e) { showError("Cannot load actions: " + e.message); });
  }

  // Remove a node retired on purpose (admins): DELETE, then reload the page without it.
  root.addEventListener("submit", function (ev) {
    var form = ev.target.closest("[data-remove-node]");
    if (!form) return;
    ev.preventDefault();
    var node = new FormData(form).get("node");
    var btn = form.querySelector("[data-confirm-template]");
    if (!window.confirm(btn.getAttribute("data-confirm-template").replace("{node}", node))) return;
    showError("");
    fetch("/api/v1/shops/" + encodeURIComponent(shop) + "/nodes/" + encodeURIComponent(node), {
      method: "DELETE",
      headers: { "X-CSRF-Token": csrf, Accept: "application/json" }
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (!r.ok) throw new Error(typeof j.detail === "string" ? j.detail : "HTTP " + r.status);
      });
    }).then(function () { window.location.reload(); })
      .catch(function (e) { showError("Failed: " + e.message); });
  });

  root.addEventListener("submit", function (ev) {
    var form = ev.target.closest("[data-remote-action]");
    if (!form) return;
    ev.preventDefault();
    var body = { shop: shop, action: form.getAttribute("data-remote-action") };
    var fd = new FormData(form);
    if (fd.get("reason")) body.reason = fd.get("reason");
    if (fd.get("duration_s")) body.duration_s = Number(fd.get("duration_s"));
    var target = fd.get("target");
    if (target) { body.node = target.split("/")[0]; body.pipeline = target.split("/").slice(1).join("/"); }
    var plain = form.querySelector("[data-confirm]");
    if (plain && !window.confirm(plain.getAttribute("data-confirm"))) return;
    var btn = form.querySelector("[data-confirm-template]");
    if (btn && !window.confirm(btn.getAttribute("data-confirm-template").replace("{target}", target))) return;
    showError("");
    fetch("/api/v1/actions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf, Accept: "application/json" },
      body: JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (j) {
        if (!r.ok) throw new Error(typeof j.detail === "string" ? j.detail : "HTTP " + r.status);
      });
    }).then(refresh).catch(function (e) { showError("Failed: " + e.message); });
  });

  refresh();
})();

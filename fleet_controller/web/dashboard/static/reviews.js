// The review page's actions: each form sends JSON to /api/v1/carts/... with the session's CSRF
// token, then reloads the page so what is shown is what the server stored (and audited).
(function () {
  "use strict";
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const errorBox = document.getElementById("review-error");

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "Accept": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      let detail = r.status + " " + r.statusText;
      try { const j = await r.json(); detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    return r.json();
  }

  function fail(err) {
    if (errorBox) { errorBox.textContent = err.message; errorBox.hidden = false; }
  }

  function field(form, name) {
    const el = form.elements.namedItem(name);
    return el && el.value.trim() !== "" ? el.value.trim() : null;
  }

  function bind(form, build) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const cart = encodeURIComponent(form.dataset.cart);
      try {
        const [path, body] = build(form);
        await post("/api/v1/carts/" + cart + path, body);
        location.reload();
      } catch (err) { fail(err); }
    });
  }

  document.querySelectorAll("form.fix-line").forEach((form) => bind(form, (f) => {
    const body = { product: f.dataset.product };
    const np = field(f, "new_product"); if (np) body.new_product = np;
    const q = field(f, "quantity"); if (q !== null) body.quantity = parseInt(q, 10);
    const to = field(f, "to_cart"); if (to) body.to_cart = to;
    if (!np && q === null && !to) throw new Error("Give a product, a quantity or a cart to move the line to.");
    return ["/fix", body];
  }));
  const accept = document.getElementById("accept");
  if (accept) bind(accept, (f) => ["/accept", { comment: field(f, "comment") || "" }]);
  const reassign = document.getElementById("reassign");
  if (reassign) bind(reassign, (f) => ["/reassign", { shopper: field(f, "shopper") || "" }]);
})();

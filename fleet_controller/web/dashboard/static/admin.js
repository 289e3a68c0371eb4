// Admin pages and shop actions: confirmations and copy buttons. A static file, so the pages
// need no inline script (a Content-Security-Policy without 'unsafe-inline' holds).
"use strict";
(function () {
  // Any submit button (or link) with data-confirm asks first; the text names the scope.
  document.addEventListener("click", function (ev) {
    var el = ev.target.closest("[data-confirm]");
    if (el && !window.confirm(el.getAttribute("data-confirm"))) {
      ev.preventDefault();
      ev.stopImmediatePropagation();
    }
  }, true);
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("[data-copy]");
    if (!btn) return;
    var src = document.getElementById(btn.getAttribute("data-copy"));
    if (src && navigator.clipboard) {
      navigator.clipboard.writeText(src.textContent.trim()).then(function () { btn.textContent = "Copied"; });
    }
  });
})();

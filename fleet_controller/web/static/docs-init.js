// Start Swagger UI (/docs) or ReDoc (/redoc) from the vendored bundles. A static file, not an
// inline script, so the pages run under the controller's Content Security Policy.
"use strict";
(function () {
  const url = document.body.dataset.openapi || "/openapi.json";
  if (document.getElementById("swagger-ui") && window.SwaggerUIBundle) {
    window.ui = window.SwaggerUIBundle({ url, dom_id: "#swagger-ui", deepLinking: true,
      presets: [window.SwaggerUIBundle.presets.apis], layout: "BaseLayout" });
  } else if (document.getElementById("redoc") && window.Redoc) {
    window.Redoc.init(url, {}, document.getElementById("redoc"));
  }
})();

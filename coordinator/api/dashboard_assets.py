"""The dashboard's stylesheet and script, served as files of their own (/dashboard.css, /dashboard.js)
so the page needs no inline style or script: it works under a strict Content-Security-Policy
(`default-src 'self'`). The script only refreshes the page's content in place; without it the page
is complete, and a <noscript> meta refresh reloads it instead."""

from __future__ import annotations

CSS = """body{font:14px system-ui,sans-serif;margin:1.5em 2em;color:#222;background:#fff}
h1{margin:0 0 .2em}h2{margin:1.4em 0 .4em;font-size:1.15em}
.sub{color:#555;margin:0 0 1em}.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em .9em;min-width:9.5em;background:#fafafa}
.card b{display:block;font-size:1.5em;margin-top:.15em}.card span{color:#555;font-size:.85em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.text{text-align:left}
.committed,.released,.promoted,.pinned{color:#070}.abandoned,.held,.rollback,.rolled{color:#a00}
.open,.canary,.candidate{color:#05a}.superseded,.retired{color:#777}
svg{background:#fafafa;border:1px solid #ddd}.warn{color:#a00;font-weight:bold}
.cols{display:flex;flex-wrap:wrap;gap:2em}"""

JS = """"use strict";
// Refresh the dashboard's content in place every data-refresh seconds (same-origin fetch, no eval).
(function () {
  var body = document.body;
  var seconds = Math.max(1, parseInt(body.getAttribute("data-refresh") || "10", 10));
  function refresh() {
    fetch(window.location.href, { headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (answer) {
        if (!answer.ok) throw new Error("HTTP " + answer.status);
        return answer.text();
      })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("content");
        var here = document.getElementById("content");
        if (fresh && here) here.replaceWith(fresh);
        body.removeAttribute("data-stale");
      })
      .catch(function () {
        body.setAttribute("data-stale", "1");  // the coordinator is unreachable: keep the last view
      })
      .finally(function () {
        window.setTimeout(refresh, seconds * 1000);
      });
  }
  window.setTimeout(refresh, seconds * 1000);
})();
"""

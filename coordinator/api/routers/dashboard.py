"""The dashboard: one server-rendered HTML page, inline SVG chart, no scripts, no CDN."""

from __future__ import annotations

import html
import time

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from coordinator.api.deps import ServicesDep
from coordinator.api.routers.rounds import recent_rounds

router = APIRouter(tags=["ops"])

STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
.committed{color:#070}.abandoned{color:#a00}.open{color:#05a}svg{background:#fafafa;border:1px solid #ddd}"""


def accuracy_chart(points: list[tuple[int, float]], width: int = 640, height: int = 240) -> str:
    """Accuracy (0..1) by model version as an SVG polyline with axes and labelled points."""
    pad = 40
    parts = [
        f'<svg id="accuracy-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="accuracy by model version">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="#888"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = height - pad - tick * (height - pad - 10)
        parts.append(f'<text x="4" y="{y + 4:.1f}" font-size="10">{tick:.2f}</text>')
    if not points:
        parts.append(
            f'<text x="{pad + 10}" y="{height / 2}" font-size="12">no evaluated model yet '
            "(start with --eval-data)</text>"
        )
    else:
        lo, hi = points[0][0], max(points[-1][0], points[0][0] + 1)
        coords = [
            (pad + (v - lo) / (hi - lo) * (width - pad - 20), height - pad - a * (height - pad - 10)) for v, a in points
        ]
        parts.append(
            '<polyline fill="none" stroke="#05a" stroke-width="2" points="'
            + " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            + '"/>'
        )
        for (v, a), (x, y) in zip(points, coords, strict=True):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#05a"><title>v{v}: {a:.4f}</title></circle>')
        parts.append(
            f'<text x="{pad}" y="{height - 22}" font-size="10">v{lo}</text>'
            f'<text x="{width - 40}" y="{height - 22}" font-size="10">v{points[-1][0]}</text>'
        )
    parts.append(f'<text x="{width / 2 - 40}" y="{height - 6}" font-size="11">model version</text></svg>')
    return "".join(parts)


def privacy_line(rounds: list, budget_note: str | None) -> str:
    """Differential privacy at a glance: epsilon spent (at its delta) and the budget's state."""
    spent = next((r for r in rounds if r.epsilon is not None), None)
    text = (
        ""
        if spent is None
        else f" · privacy spent <b>&epsilon; = {spent.epsilon:.3f}</b> at &delta; = {spent.dp_delta:g}"
        + (
            f" (Poisson sampling, q = {spent.dp_sampling_rate:.3g})"
            if spent.dp_sampling == "poisson"
            else " (no amplification by sampling)"
        )
    )
    return text + (f" · <b>{html.escape(budget_note)}</b>" if budget_note else "")


# the page is self-contained: inline CSS and SVG, no scripts, nothing loaded, never framed
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def secagg_cell(r) -> str:
    """A secure-aggregation round's phase (and cohort), beside its strategy."""
    if not r.secure_aggregation:
        return ""
    return f" · secure aggregation: {html.escape(r.secagg_phase or '')} ({r.secagg_cohort or 0} devices)"


@router.get("/", response_class=HTMLResponse, include_in_schema=True)
def dashboard(services: ServicesDep) -> HTMLResponse:
    store = services.store
    points = [(v.version, float(v.accuracy)) for v in store.versions() if v.accuracy is not None]
    rounds = recent_rounds(store, 100)
    devices = store.count_devices()
    e = html.escape
    rows = "".join(
        f'<tr><td>{r.id}</td><td class="{r.status}">{r.status}</td><td>v{r.base_version}</td>'
        f"<td>{r.assigned}/{r.max_assignments}</td><td>{r.received}/{r.goal}</td><td>{r.total_samples:g}</td>"
        f"<td>{'' if r.result_version is None else 'v' + str(r.result_version)}</td>"
        f"<td>{e(r.strategy)}{secagg_cell(r)}</td>"
        f"<td>{e(time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r.opened_at)))}</td>"
        f"<td>{'' if r.epsilon is None else f'{r.epsilon:.3f}'}</td>"
        f"<td style='text-align:left'>{e(r.reason or '')}</td></tr>"
        for r in rounds
    )
    acc = f"{points[-1][1]:.4f} (v{points[-1][0]})" if points else "n/a"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pocketfed coordinator</title>
<meta http-equiv="refresh" content="30"><style>{STYLE}</style></head><body>
<h1>pocketfed coordinator</h1>
<p>Model version <b>v{services.versions.latest()}</b> · latest accuracy <b>{acc}</b> ·
{devices} devices enrolled
{" · <b>paused</b>" if services.rounds.paused else ""}{privacy_line(rounds, services.privacy.budget_note)}</p>
<h2>Accuracy by model version</h2>{accuracy_chart(points)}
<h2>Rounds</h2><table id="rounds"><tr><th>round</th><th>status</th><th>base</th><th>assigned</th>
<th>updates</th><th>samples</th><th>result</th><th>strategy</th><th>opened (UTC)</th><th>&epsilon;</th>
<th>reason</th></tr>
{rows}</table></body></html>"""
    return HTMLResponse(page, headers=PAGE_HEADERS)

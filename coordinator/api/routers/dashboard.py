"""The operator's dashboard: one server-rendered HTML page per population (fleet health, accuracy and
personalization lift per version, releases and rollbacks, privacy budget, bytes) with an inline SVG
chart; its stylesheet and refresh script are files of their own (api/dashboard_assets.py), so it runs
under a strict CSP. Nothing from a CDN."""

from __future__ import annotations

import html
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import HTMLResponse

from coordinator.api.dashboard_assets import CSS, JS
from coordinator.api.deps import ServicesDep
from coordinator.api.routers.rounds import recent_rounds
from coordinator.api.schemas import RoundSummary
from coordinator.service import Services

router = APIRouter(tags=["ops"])

# the page's own policy (a header from the server may tighten it): same-origin files only, no inline code
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = {  # the same policy as a header, plus what only a header can say
    "Content-Security-Policy": CSP + "; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
NOSNIFF = {"X-Content-Type-Options": "nosniff"}
ACTIVE_SECONDS = 600.0  # "active": checked in within the last ten minutes
DASH = "—"  # shown where a figure is not measured (yet)


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


def _num(value: float | None, fmt: str = ".4f") -> str:
    return DASH if value is None else format(value, fmt)


def _size(n: float | None) -> str:
    if n is None:
        return DASH
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return DASH


def _when(t: float | None) -> str:
    return "" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _card(label: str, value: str, note: str = "", ident: str = "") -> str:
    ident = f' id="{ident}"' if ident else ""
    return f'<div class="card"{ident}>{html.escape(label)}<b>{value}</b><span>{html.escape(note)}</span></div>'


def _dropout(r: RoundSummary) -> float | None:
    """Assigned devices that never uploaded, as a fraction of those assigned (closed rounds only)."""
    if r.status == "open" or r.assigned == 0:
        return None
    return max(0, r.assigned - r.received) / r.assigned


def fleet_health(services: Services, rounds: list[RoundSummary]) -> str:
    now = services.rounds.clock()
    closed = [r for r in rounds if r.status != "open"][:20]
    dropouts = [d for d in (_dropout(r) for r in closed) if d is not None]
    durations = sorted(r.closed_at - r.opened_at for r in closed if r.closed_at is not None)
    current = next((r for r in rounds if r.status == "open"), None)
    cards = [
        _card("devices enrolled", str(services.store.count_devices()), ident="devices-enrolled"),
        _card(
            "devices active",
            str(services.store.count_active_devices(now - ACTIVE_SECONDS)),
            "checked in, last 10 min",
            "devices-active",
        ),
        _card("check-ins / minute", str(services.checkin.per_minute()), "this replica, last 60 s", "checkins"),
        _card(
            "open round",
            DASH if current is None else f"{current.id}: {current.received}/{current.goal}",
            "" if current is None else f"{current.assigned} assigned" + (", canary" if current.canary else ""),
            "open-round",
        ),
        _card(
            "dropout rate",
            DASH if not dropouts else f"{sum(dropouts) / len(dropouts):.0%}",
            f"assigned, never uploaded; last {len(dropouts)} rounds",
            "dropout",
        ),
        _card(
            "round duration",
            DASH if not durations else f"{durations[len(durations) // 2]:.0f} s",
            "median, last closed rounds",
            "duration",
        ),
    ]
    return '<div class="cards" id="fleet-health">' + "".join(cards) + "</div>"


def federated_by_version(services: Services) -> dict[int, tuple[float, float, float]]:
    """(global accuracy, personal accuracy, lift) the devices reported per version, from the federated
    metrics service when the coordinator has one (issue 17.1); empty otherwise, shown as "—"."""
    source = services.fedmetrics
    if source is None:
        return {}
    return {v: (m.global_accuracy, m.personal_accuracy, m.lift) for v, m in source.per_version().items()}


def versions_table(services: Services) -> str:
    releases = services.releases
    status = releases.status_of(releases.state(), releases.last_actions())
    federated = federated_by_version(services)
    rows = []
    for v in services.store.versions(20):
        figures = "".join(f"<td>{_num(x)}</td>" for x in federated.get(v.version, (None, None, None)))
        s = status(v.version)
        rows.append(
            f'<tr><td>v{v.version}</td><td class="{s}">{s}</td><td>{_num(v.accuracy)}</td>{figures}'
            f"<td>{_size(v.size_bytes)}</td><td>{'' if v.round_id is None else v.round_id}</td></tr>"
        )
    return (
        '<table id="versions"><tr><th>version</th><th>release</th><th>held-out accuracy</th>'
        "<th>federated accuracy</th><th>personal accuracy</th><th>personalization lift</th><th>size</th>"
        "<th>round</th></tr>" + "".join(rows) + "</table>"
    )


def releases_table(services: Services) -> str:
    e = html.escape
    rows = "".join(
        f'<tr><td>{_when(r.at)}</td><td>v{r.version}</td><td class="{e(r.action)}">{e(r.action)}</td>'
        f'<td class="text">{e(r.actor)}</td><td class="text">{e(r.reason)}</td></tr>'
        for r in services.store.releases(15)
    )
    return (
        '<table id="releases"><tr><th>when (UTC)</th><th>version</th><th>change</th><th>by</th><th>why</th></tr>'
        + rows
        + "</table>"
    )


def privacy_cards(services: Services, rounds: list[RoundSummary]) -> str:
    cfg = services.rounds.round_settings
    spent = next((r for r in rounds if r.epsilon is not None), None)
    note = services.privacy.budget_note
    cards = [
        _card("differential privacy", "on" if cfg.dp_enabled else "off", f"noise z = {cfg.dp_noise_multiplier:g}"),
        _card(
            "ε spent",
            DASH if spent is None else f"{spent.epsilon:.3f}",
            "" if spent is None else f"at δ = {spent.dp_delta:g}, " + sampling_note(spent),
            "epsilon",
        ),
        _card("ε budget", _num(cfg.dp_epsilon_budget, "g"), f"on exceeding: {cfg.dp_on_budget}"),
    ]
    warn = f'<p class="warn">{html.escape(note)}</p>' if note else ""
    return '<div class="cards" id="privacy">' + "".join(cards) + "</div>" + warn


def sampling_note(r: RoundSummary) -> str:
    if r.dp_sampling == "poisson":
        return f"Poisson sampling, q = {r.dp_sampling_rate:.3g}"
    return "no amplification by sampling"


def secagg_cell(r: RoundSummary) -> str:
    """A secure-aggregation round's phase (and cohort), beside its strategy."""
    if not r.secure_aggregation:
        return ""
    return f" · secure aggregation: {html.escape(r.secagg_phase or '')} ({r.secagg_cohort or 0} devices)"


def bytes_cards(services: Services, rounds: list[RoundSummary]) -> str:
    registry = services.metrics.registry
    uploads = registry.get_sample_value("pf_upload_bytes_count") or 0.0
    uploaded = registry.get_sample_value("pf_upload_bytes_sum") or 0.0
    released = services.store.version(services.releases.released())
    model = None if released is None else released.size_bytes
    committed = [r for r in rounds if r.status == "committed"][:20]
    per_round = None if model is None or not committed else model * sum(r.received for r in committed) / len(committed)
    cards = [
        _card("model size", _size(model), "the released version", "model-size"),
        _card("uploads", f"{uploads:.0f}", "bodies read, this replica", "uploads"),
        _card("uploaded", _size(uploaded), "this replica since start", "uploaded"),
        _card("downloads per round", _size(per_round), "model size × updates (upper bound)"),
    ]
    return '<div class="cards" id="bytes">' + "".join(cards) + "</div>"


def rounds_table(rounds: list[RoundSummary]) -> str:
    e = html.escape
    rows = "".join(
        f'<tr><td>{r.id}{" (canary)" if r.canary else ""}</td><td class="{r.status}">{r.status}</td>'
        f"<td>v{r.base_version}</td><td>{r.assigned}/{r.max_assignments}</td><td>{r.received}/{r.goal}</td>"
        f"<td>{_num(_dropout(r), '.0%')}</td>"
        f"<td>{DASH if r.closed_at is None else f'{r.closed_at - r.opened_at:.0f} s'}</td>"
        f"<td>{r.total_samples:g}</td><td>{'' if r.result_version is None else 'v' + str(r.result_version)}</td>"
        f"<td>{e(r.strategy)}{secagg_cell(r)}</td><td>{_when(r.opened_at)}</td>"
        f"<td>{'' if r.epsilon is None else f'{r.epsilon:.3f}'}</td>"
        f'<td class="text">{e(r.reason or "")}</td></tr>'
        for r in rounds
    )
    return (
        '<table id="rounds"><tr><th>round</th><th>status</th><th>base</th><th>assigned</th><th>updates</th>'
        "<th>dropout</th><th>duration</th><th>samples</th><th>result</th><th>strategy</th><th>opened (UTC)</th>"
        "<th>&epsilon;</th><th>reason</th></tr>" + rows + "</table>"
    )


def population_links(request: Request, current: str) -> str:
    """Links to every population's dashboard, when there is more than the default."""
    names = request.app.state.populations.names()
    if len(names) < 2:
        return ""
    links = " · ".join(
        f"<b>{html.escape(n)}</b>"
        if n == current
        else f'<a href="{"/" if n == "default" else f"/v1/populations/{n}/dashboard"}">{html.escape(n)}</a>'
        for n in names
    )
    return f'<p class="sub" id="populations">populations: {links}</p>'


@router.get("/dashboard.css", include_in_schema=False)
def stylesheet() -> Response:
    return Response(CSS, media_type="text/css", headers={"Cache-Control": "public, max-age=300", **NOSNIFF})


@router.get("/dashboard.js", include_in_schema=False)
def script() -> Response:
    return Response(JS, media_type="text/javascript", headers={"Cache-Control": "public, max-age=300", **NOSNIFF})


@router.get("/", response_class=HTMLResponse, include_in_schema=True)
def dashboard(
    request: Request,
    services: ServicesDep,
    refresh: Annotated[int, Query(ge=1, le=3600, description="seconds between refreshes")] = 10,
) -> HTMLResponse:
    """The operator's dashboard (of the population the path names; /v1/populations/{name}/dashboard)."""
    store = services.store
    points = [(v.version, float(v.accuracy)) for v in store.versions() if v.accuracy is not None]
    rounds = recent_rounds(store, 100)
    state = services.releases.state()
    release = f"v{state.released}" + (" (pinned)" if state.pinned else "")
    canary = "" if state.canary is None else f" · canary <b>v{state.canary}</b>"
    title = f"pocketfed · {html.escape(services.population)}"
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="{CSP}"><link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard.css"><script src="/dashboard.js" defer></script>
<noscript><meta http-equiv="refresh" content="{refresh}"></noscript></head>
<body data-refresh="{refresh}"><div id="content">
<h1>{title}</h1>{population_links(request, services.population)}
<p class="sub">released <b id="released">{release}</b>{canary} · newest v{services.versions.latest()}
{" · <b>paused</b>" if services.rounds.paused else ""} · updated
<span id="updated">{_when(time.time())}</span> UTC</p>
<h2>Fleet health</h2>{fleet_health(services, rounds)}
<h2>Accuracy and personalization by version</h2>
<div class="cols">{versions_table(services)}{accuracy_chart(points)}</div>
<h2>Releases and rollbacks</h2>{releases_table(services)}
<h2>Privacy budget</h2>{privacy_cards(services, rounds)}
<h2>Bytes</h2>{bytes_cards(services, rounds)}
<h2>Rounds</h2>{rounds_table(rounds)}
</div></body></html>"""
    return HTMLResponse(page, headers=PAGE_HEADERS)

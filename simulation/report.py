"""An offline HTML report of a simulation: three inline SVG charts and a table, no scripts, no CDN.

Charts: server-side accuracy by round; global vs personal accuracy (on the devices' held-out
data, with the server-side accuracy beside them); bytes up and down per round.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from engine.serialize.container import write_atomic

COLORS = ("#05a", "#d60", "#080", "#a0a")
W, H, PAD = 640, 260, 48
STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:980px}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}svg{background:#fafafa;border:1px solid #ddd}code{background:#f3f3f3}"""


def _frame(chart_id: str, title: str, y_ticks: Sequence[tuple[float, str]], x_labels: Sequence[str]) -> list[str]:
    parts = [
        f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#888"/>',
        f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD}" stroke="#888"/>',
    ]
    for frac, text in y_ticks:
        y = H - PAD - frac * (H - PAD - 10)
        parts.append(
            f'<line x1="{PAD - 3}" y1="{y:.1f}" x2="{W - 10}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="2" y="{y + 4:.1f}" font-size="10">{html.escape(text)}</text>'
        )
    step = max(1, len(x_labels) // 12)
    for i, label in enumerate(x_labels):
        if i % step == 0 or i == len(x_labels) - 1:
            parts.append(
                f'<text x="{_x(i, len(x_labels)) - 4:.1f}" y="{H - PAD + 14}" font-size="10">'
                f"{html.escape(label)}</text>"
            )
    parts.append(f'<text x="{W / 2 - 20}" y="{H - 8}" font-size="11">round</text>')
    return parts


def _x(i: int, n: int) -> float:
    return PAD + 30 + (i / max(n - 1, 1)) * (W - PAD - 60)


def _legend_entry(k: int, name: str, color: str) -> str:
    """The k-th line of a chart's legend, top left inside the frame."""
    return (
        f'<rect x="{PAD + 10}" y="{14 + 14 * k}" width="10" height="10" fill="{color}"/>'
        f'<text x="{PAD + 24}" y="{23 + 14 * k}" font-size="11">{html.escape(name)}</text>'
    )


def line_chart(chart_id: str, title: str, series: dict[str, Sequence[float | None]], x_labels: Sequence[str]) -> str:
    """Values in 0..1 (accuracies) by round; None values are gaps."""
    parts = _frame(chart_id, title, [(t, f"{t:.2f}") for t in (0, 0.25, 0.5, 0.75, 1.0)], x_labels)
    for k, (name, values) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        points = [(_x(i, len(values)), H - PAD - v * (H - PAD - 10)) for i, v in enumerate(values) if v is not None]
        if len(points) > 1:
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                + " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
                + '"/>'
            )
        for (x, y), v in zip(points, [v for v in values if v is not None]):
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{html.escape(name)}: '
                f"{v:.4f}</title></circle>"
            )
        parts.append(_legend_entry(k, name, color))
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(chart_id: str, title: str, series: dict[str, Sequence[float]], x_labels: Sequence[str]) -> str:
    """Side-by-side bars per round (bytes); the y axis leaves headroom above the bars for the legend."""
    largest = max([max(v, default=0) for v in series.values()] + [1])
    unit, unit_name = next(
        (u, name) for u, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B")) if largest >= u or u == 1
    )
    top = largest * 1.3
    ticks = [(t, f"{t * top / unit:.2g} {unit_name}") for t in (0, 0.25, 0.5, 0.75, 1.0)]
    parts = _frame(chart_id, title, ticks, x_labels)
    n, k_count = len(x_labels), len(series)
    group = min(56.0, 0.8 * (W - PAD - 60) / max(n - 1, 1))
    bar = group / k_count
    for k, (name, values) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        for i, v in enumerate(values):
            h = v / top * (H - PAD - 10)
            x = _x(i, n) - group / 2 + k * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{H - PAD - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{html.escape(name)} round {i + 1}: {_human(v)}</title></rect>'
            )
        parts.append(_legend_entry(k, name, color))
    parts.append("</svg>")
    return "".join(parts)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _cell(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def render(records: list[dict], summary: dict) -> str:
    labels = [str(r["round"]) for r in records]
    accuracy = line_chart(
        "accuracy-chart",
        "server-side test accuracy by round",
        {"global model, test split": [r["accuracy"] for r in records]},
        labels,
    )
    personal = line_chart(
        "personal-chart",
        "global vs personal accuracy by round",
        {
            "global model, test split": [r["accuracy"] for r in records],
            "global model, device held-out": [r["local_global_acc"] for r in records],
            "personal model, device held-out": [r["personal_acc"] for r in records],
        },
        labels,
    )
    traffic = bar_chart(
        "bytes-chart",
        "bytes per round",
        {
            "up (updates)": [r["bytes_up"] for r in records],
            "down (models)": [r["bytes_down"] for r in records],
        },
        labels,
    )
    columns = [
        "round",
        "version",
        "accuracy",
        "loss",
        "devices",
        "failed",
        "samples",
        "train_loss",
        "local_global_acc",
        "personal_acc",
        "bytes_up",
        "bytes_down",
        "seconds",
    ]
    private = any(r.get("epsilon") is not None for r in records)
    if private:
        columns.insert(columns.index("bytes_up"), "epsilon")
    rows = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in records)
    config = html.escape(json.dumps(summary.get("config", {}), sort_keys=True))
    final = summary["final_accuracy"]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>pocketfed simulation</title>
<style>{STYLE}</style></head><body>
<h1>pocketfed simulation</h1>
<p>{summary["rounds"]} rounds in {summary["seconds"]:.1f} s · test accuracy {summary["initial_accuracy"]:.4f}
(initial model) → <b>{final:.4f}</b> · personal accuracy {_cell(summary["personal_accuracy"])} ·
{_human(summary["bytes_up"])} up, {_human(summary["bytes_down"])} down</p>
{_privacy(summary) if private else ""}
<p id="secure-aggregation">Secure aggregation: <b>{"on" if summary.get("secure_aggregation") else "off"}</b>
{SECURE if summary.get("secure_aggregation") else PLAIN}</p>
<p>Configuration: <code>{config}</code></p>
<h2>Accuracy by round</h2>{accuracy}
<h2>Global vs personal accuracy</h2>
<p>Personal = the global model with the classifier head fine-tuned on the device (never uploaded),
measured on each participant's held-out samples; averaged over the round's participants.</p>{personal}
<h2>Bytes per round</h2>{traffic}
<h2>Rounds</h2><table id="rounds"><tr>{"".join(f"<th>{c}</th>" for c in columns)}</tr>{rows}</table>
</body></html>"""


SECURE = "(the coordinator saw only each round's masked sum, never one device's update)."
PLAIN = "(the coordinator saw every device's update)."


def _privacy(summary: dict) -> str:
    """The differential-privacy line: the budget spent so far (the table has it round by round)."""
    dp = summary.get("privacy") or {}
    budget = dp.get("epsilon_budget")
    return (
        f'<p id="privacy">Client-level differential privacy: ε = <b>{_cell(summary.get("epsilon"))}</b> '
        f"at δ = {dp.get('delta', 0):g} after {summary['rounds']} rounds (noise multiplier "
        f"{_cell(dp.get('noise_multiplier'))}; budget {_cell(budget) if budget else 'none'}; "
        f"sampling {html.escape(str(dp.get('sampling', 'poisson')))}).</p>"
    )


def write_report(path: str | Path, records: list[dict], summary: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, render(records, summary).encode())

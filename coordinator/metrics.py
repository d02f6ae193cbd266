"""Counters and gauges rendered in the Prometheus text exposition format (no client library)."""

from __future__ import annotations

import threading
from collections import defaultdict

HELP = {
    "pf_http_requests_total": ("counter", "HTTP requests by method, route and status"),
    "pf_updates_accepted_total": ("counter", "updates accepted into a round's aggregate"),
    "pf_updates_refused_total": ("counter", "requests refused, by reason"),
    "pf_rounds_total": ("counter", "rounds closed, by outcome"),
    "pf_current_round": ("gauge", "id of the open round (0 when none)"),
    "pf_current_round_received": ("gauge", "updates received by the open round"),
    "pf_model_version": ("gauge", "latest model version"),
    "pf_model_accuracy": ("gauge", "server-side accuracy of the latest evaluated version"),
    "pf_devices": ("gauge", "enrolled devices"),
    "pf_paused": ("gauge", "1 when round scheduling is paused"),
    "pf_upload_commits_total": ("counter", "durable transactions (fsyncs) that stored accepted updates"),
    "pf_upload_commit_updates_total": (
        "counter",
        "updates stored by them: this over the commits is the group-commit batch size",
    ),
    "pf_dp_epsilon": ("gauge", "differential privacy: epsilon spent so far (at the configured delta)"),
    "pf_dp_clip_norm": ("gauge", "differential privacy: clip norm C of the last committed round"),
    "pf_dp_budget_exhausted": ("gauge", "1 when one more round would exceed the privacy budget"),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class Metrics:
    """Process-local counters (they restart at 0, as Prometheus counters may)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def render(self, gauges: dict[str, float], counters_from_db: dict[str, dict[tuple, float]]) -> str:
        with self._lock:
            series = {name: dict(values) for name, values in self._counters.items()}
        series.update(counters_from_db)
        for name, value in gauges.items():
            series[name] = {(): value}
        lines = []
        for name in sorted(series):
            kind, text = HELP.get(name, ("untyped", name))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(series[name].items()):
                lines.append(f"{name}{_labels(dict(labels))} {float(value):g}")
        return "\n".join(lines) + "\n"

"""Prometheus metrics (prometheus-client), one registry per app so that several apps in one process
(tests) never share counters.

Counters and histograms are kept in memory (they restart at 0, as Prometheus counters may);
the state of rounds, versions and devices is read from the services at scrape time through
`watch(read_state)`, so /metrics always agrees with the database. Label values are bounded: HTTP
methods outside the standard set and paths matching no route collapse to one value each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD, UNMATCHED_ROUTE = "other", "unmatched"

disable_created_metrics()  # no pf_*_created series beside every counter: they doubled the output for nothing

GAUGES = {
    "pf_current_round": "id of the open round (0 when none)",
    "pf_current_round_received": "updates received by the open round",
    "pf_model_version": "latest model version",
    "pf_released_version": "the version devices get as their base (the release gate passed it)",
    "pf_model_accuracy": "server-side accuracy of the latest evaluated version",
    "pf_devices": "enrolled devices",
    "pf_paused": "1 when round scheduling is paused",
    "pf_dp_epsilon": "differential privacy: epsilon spent so far (at the configured delta)",
    "pf_dp_clip_norm": "differential privacy: clip norm C of the last committed round",
    "pf_dp_budget_exhausted": "1 when one more round would exceed the privacy budget",
    "pf_federated_version": "newest model version devices reported federated metrics for",
    "pf_federated_devices": "devices that reported on that version",
    "pf_federated_global_accuracy": "their sample-weighted mean accuracy of that version, on their own held-out data",
    "pf_federated_personal_accuracy": "the same with each device's personal layers",
    "pf_personalization_lift": "personal minus global federated accuracy of that version",
}
STATE_COUNTERS = {  # counted in the database (or by the upload writer), read at scrape time
    "pf_rounds": "rounds closed, by outcome",
    "pf_updates_accepted": "updates accepted into a round's aggregate",
    "pf_upload_commits": "durable transactions (fsyncs) that stored accepted updates",
    "pf_upload_commit_updates": "updates stored by them: this over the commits is the group-commit batch size",
}


@dataclass
class State:
    """What the services report at scrape time: gauge values, and counters by label tuple."""

    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)


class _StateCollector(Collector):
    def __init__(self, read: Callable[[], State]):
        self.read = read

    def collect(self) -> Iterator[Metric]:
        state = self.read()
        for name, value in state.gauges.items():
            family = GaugeMetricFamily(name, GAUGES[name])
            family.add_metric([], float(value))
            yield family
        for name, series in state.counters.items():
            labels = [k for k, _ in next(iter(series))] if series else []
            family = CounterMetricFamily(name, STATE_COUNTERS[name], labels=labels)
            for key, value in series.items():
                family.add_metric([v for _, v in key], float(value))
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "pf_http_requests", "HTTP requests by method, route and status", ["method", "route", "status"], registry=r
        )
        self.refused = Counter("pf_updates_refused", "requests refused, by reason", ["reason"], registry=r)
        self.upload_seconds = Histogram(
            "pf_upload_seconds",
            "upload latency: request start to answer (waiting for a slot and the group commit included)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.upload_bytes = Histogram(
            "pf_upload_bytes",
            "size of upload bodies read",
            buckets=tuple(4.0**k * 1024 for k in range(10)),  # 1 KiB .. 256 MiB
            registry=r,
        )
        self.round_duration = Histogram(
            "pf_round_duration_seconds",
            "seconds from a round's opening to its close, by outcome",
            ["outcome"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600, 86400),
            registry=r,
        )

    def watch(self, read_state: Callable[[], State]) -> None:
        """Report the services' state at every scrape."""
        self.registry.register(_StateCollector(read_state))

    def request(self, method: str, route: str | None, status: int) -> None:
        method = method if method in METHODS else OTHER_METHOD
        self.http_requests.labels(method, route or UNMATCHED_ROUTE, str(status)).inc()

    def refusal(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def round_closed(self, outcome: str, seconds: float) -> None:
        self.round_duration.labels(outcome).observe(max(0.0, seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Aggregation strategies, one class per algorithm (Flower's idea), found by name; norm bounding
and differential privacy wrap any of them (norm_bound.py, dp.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coordinator.strategies.base import RoundUpdates, RunningSum, Strategy, Weights
from coordinator.strategies.dp import DifferentialPrivacy
from coordinator.strategies.fedadam import FedAdam
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedavgm import FedAvgM
from coordinator.strategies.feddyn import FedDyn
from coordinator.strategies.fedprox import FedProx
from coordinator.strategies.krum import Krum, MultiKrum
from coordinator.strategies.lr_schedule import SCHEDULES, round_lr
from coordinator.strategies.median import CoordinateMedian
from coordinator.strategies.model_average import ModelAverage
from coordinator.strategies.norm_bound import NormBounded, StrategyWrapper
from coordinator.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedProx, FedDyn, CoordinateMedian, TrimmedMean, Krum, MultiKrum)
}
OPTIONS = (
    "server_lr", "server_momentum", "beta1", "beta2", "tau", "fedprox_mu", "trim_beta", "krum_f", "krum_m",
    "feddyn_alpha", "participation",
)  # fmt: skip


def make_strategy(config: Mapping[str, Any] | Any) -> Strategy:
    """Build the strategy a round's config (a mapping, or RoundSettings) names, with the options it uses."""
    if not isinstance(config, Mapping):
        config = {k: getattr(config, k) for k in (*OPTIONS, "strategy") if hasattr(config, k)}
    name = config["strategy"]
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name](**{k: config[k] for k in OPTIONS if k in config})


__all__ = [
    "SCHEDULES",
    "STRATEGIES",
    "CoordinateMedian",
    "DifferentialPrivacy",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedDyn",
    "FedProx",
    "Krum",
    "ModelAverage",
    "MultiKrum",
    "NormBounded",
    "RoundUpdates",
    "RunningSum",
    "Strategy",
    "StrategyWrapper",
    "TrimmedMean",
    "Weights",
    "make_strategy",
    "round_lr",
]

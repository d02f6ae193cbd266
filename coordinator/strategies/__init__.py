"""Aggregation strategies, one class per algorithm (Flower's idea), found by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coordinator.strategies.base import RunningSum, Strategy, Weights
from coordinator.strategies.fedadam import FedAdam
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedavgm import FedAvgM
from coordinator.strategies.fedprox import FedProx
from coordinator.strategies.krum import Krum, MultiKrum
from coordinator.strategies.median import CoordinateMedian
from coordinator.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedProx, CoordinateMedian, TrimmedMean, Krum, MultiKrum)
}


def make_strategy(config: Mapping[str, Any]) -> Strategy:
    """Build the strategy a round's config names, with the options it uses."""
    name = config["strategy"]
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is not one of {', '.join(STRATEGIES)}")
    options = {
        k: config[k]
        for k in (
            "server_lr",
            "server_momentum",
            "beta1",
            "beta2",
            "tau",
            "fedprox_mu",
            "trim_beta",
            "krum_f",
            "krum_m",
        )
        if k in config
    }
    return STRATEGIES[name](**options)


__all__ = [
    "STRATEGIES",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "Krum",
    "MultiKrum",
    "RunningSum",
    "Strategy",
    "TrimmedMean",
    "Weights",
    "make_strategy",
]

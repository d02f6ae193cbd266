"""Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the `trim_beta` fraction of
largest and of smallest values, average the rest.

With n updates, floor(beta * n) are cut from each end, so up to that many attackers cannot pull any
coordinate outside the honest range. beta = 0 is the plain (unweighted) mean; beta must be < 0.5.
"""

from __future__ import annotations

import math

import numpy as np

from coordinator.strategies.base import Weights
from coordinator.strategies.fedavg import FedAvg


class TrimmedMean(FedAvg):
    name = "trimmed_mean"
    streaming = False

    def __init__(self, server_lr: float = 1.0, trim_beta: float = 0.2, **options: float):
        super().__init__(server_lr, **options)
        if not 0.0 <= float(trim_beta) < 0.5:
            raise ValueError(f"trim_beta {trim_beta} must be in [0, 0.5)")
        self.beta = float(trim_beta)

    def combine(self, updates: list[tuple[Weights, float]]) -> Weights:
        if not updates:
            raise ValueError("no updates to combine")
        n = len(updates)
        cut = min(math.floor(self.beta * n), (n - 1) // 2)  # always keep at least one value
        out = {}
        for k in updates[0][0]:
            values = np.sort(np.stack([np.asarray(d[k], np.float64) for d, _ in updates]), axis=0)
            out[k] = values[cut : n - cut].mean(axis=0)
        return out

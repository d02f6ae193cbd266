"""Coordinate-wise median (Yin et al. 2018): each coordinate takes the median of the round's values.

Up to half of the updates can be arbitrary (sign-flipped, scaled, noise) and the median of every
coordinate still lies between two honest values. Sample counts are ignored on purpose: a liar
would otherwise claim a huge count.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Weights
from coordinator.strategies.fedavg import FedAvg


class CoordinateMedian(FedAvg):
    name = "median"
    streaming = False

    def combine(self, updates: list[tuple[Weights, float]]) -> Weights:
        if not updates:
            raise ValueError("no updates to combine")
        return {
            k: np.median(np.stack([np.asarray(d[k], np.float64) for d, _ in updates]), axis=0) for k in updates[0][0]
        }

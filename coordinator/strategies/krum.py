"""Krum and Multi-Krum (Blanchard et al. 2017): keep the updates closest to their neighbours.

Each update i gets a score: the sum of squared L2 distances to its n - f - 2 nearest other
updates (f = `krum_f`, the number of attackers tolerated; the paper needs n >= 2f + 3, and with
fewer updates the neighbourhood shrinks to at least one). Krum returns the single update with
the lowest score; Multi-Krum averages the `krum_m` lowest-scoring ones.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Weights
from coordinator.strategies.fedavg import FedAvg


def krum_scores(updates: list[Weights], f: int) -> np.ndarray:
    """Score of each update: sum of squared distances to its n - f - 2 closest others."""
    n = len(updates)
    flat = np.stack([np.concatenate([np.asarray(d[k], np.float64).ravel() for k in sorted(d)]) for d in updates])
    sq = np.sum(flat * flat, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    neighbours = min(max(n - int(f) - 2, 1), n - 1)
    if neighbours <= 0:  # a single update: nothing to compare with
        return np.zeros(n)
    return np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)


class MultiKrum(FedAvg):
    name = "multikrum"
    streaming = False

    def __init__(self, server_lr: float = 1.0, krum_f: int = 1, krum_m: int = 5, **options: float):
        super().__init__(server_lr, **options)
        if int(krum_f) < 0 or int(krum_m) < 1:
            raise ValueError(f"krum_f {krum_f} must be >= 0 and krum_m {krum_m} >= 1")
        self.f, self.m = int(krum_f), int(krum_m)

    def selected(self, updates: list[tuple[Weights, float]]) -> list[int]:
        """Indices of the chosen updates, best first (ties broken by arrival order)."""
        scores = krum_scores([d for d, _ in updates], self.f)
        return [int(i) for i in np.argsort(scores, kind="stable")[: self.m]]

    def combine(self, updates: list[tuple[Weights, float]]) -> Weights:
        if not updates:
            raise ValueError("no updates to combine")
        chosen = [updates[i][0] for i in self.selected(updates)]
        return {k: np.mean([np.asarray(d[k], np.float64) for d in chosen], axis=0) for k in chosen[0]}


class Krum(MultiKrum):
    """Multi-Krum with m = 1: the one most central update."""

    name = "krum"

    def __init__(self, server_lr: float = 1.0, krum_f: int = 1, **options: float):
        options.pop("krum_m", None)
        super().__init__(server_lr, krum_f=krum_f, krum_m=1, **options)

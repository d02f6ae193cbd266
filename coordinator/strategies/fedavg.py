"""FedAvg (McMahan et al. 2017): new = base + server_lr * sample-weighted mean delta."""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Strategy, Weights


class FedAvg(Strategy):
    name = "fedavg"

    def step(self, base, delta, state) -> tuple[Weights, Weights]:
        new = {k: np.asarray(base[k], np.float64) + self.server_lr * d for k, d in delta.items()}
        return new, state

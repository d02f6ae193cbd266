"""FedAvgM (Hsu et al. 2019): server momentum over rounds.

v   = momentum * v + delta        (v starts at 0)
new = base + server_lr * v
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Strategy, Weights


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.9, **options: float):
        super().__init__(server_lr, **options)
        self.momentum = float(server_momentum)

    def step(self, base, delta, state) -> tuple[Weights, Weights]:
        new_state, new = dict(state), {}
        for k, d in delta.items():
            v = self.momentum * state.get(f"v/{k}", 0.0) + d
            new_state[f"v/{k}"] = np.asarray(v, np.float64)
            new[k] = np.asarray(base[k], np.float64) + self.server_lr * v
        return new, new_state

"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"), the delta as pseudo-gradient:

    m   = beta1 * m + (1 - beta1) * delta
    v   = beta2 * v + (1 - beta2) * delta^2
    new = base + server_lr * m / (sqrt(v) + tau)

m and v start at 0 and, as in the paper, there is no bias correction.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Strategy, Weights


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(
        self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, **options: float
    ):
        super().__init__(server_lr, **options)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def step(self, base, delta, state) -> tuple[Weights, Weights]:
        new_state, new = dict(state), {}
        for k, d in delta.items():
            m = self.beta1 * state.get(f"m/{k}", 0.0) + (1 - self.beta1) * d
            v = self.beta2 * state.get(f"v/{k}", 0.0) + (1 - self.beta2) * np.square(d)
            new_state[f"m/{k}"], new_state[f"v/{k}"] = np.asarray(m, np.float64), np.asarray(v, np.float64)
            new[k] = np.asarray(base[k], np.float64) + self.server_lr * m / (np.sqrt(v) + self.tau)
        return new, new_state

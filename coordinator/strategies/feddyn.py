"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization"): the server half.

Each device k keeps a state g_k and trains on L_k(w) - <g_k, w> + alpha/2 ||w - base||^2, then
sets g_k <- g_k - alpha * delta_k; so at a device's stationary point the regularized objectives
agree with the global one, which removes the client drift that stalls FedAvg on non-IID splits.
The server keeps h (starts at 0):

    h   = h - alpha * participation * delta      (delta: the round's mean; participation = K / N)
    new = base + delta - h / alpha

The device half: the Python agent (device_agent/feddyn.py, told alpha by the task's `feddyn_alpha`,
g_k kept in its state directory) and `pf-sim --stacked` (simulation/stacked.py). The TypeScript agent
does not implement it. Secure aggregation rounds are refused (settings.py): they keep no g_k.
"""

from __future__ import annotations

import numpy as np

from coordinator.strategies.base import Strategy, Weights


class FedDyn(Strategy):
    name = "feddyn"
    device_side = True  # needs devices that train FedDyn's local objective and keep g_k

    def __init__(self, server_lr: float = 1.0, feddyn_alpha: float = 0.01, participation: float = 0.1, **options):
        super().__init__(server_lr, **options)
        if not feddyn_alpha > 0 or not 0 < participation <= 1:
            raise ValueError(f"feddyn needs alpha > 0 and participation in (0, 1], got {feddyn_alpha}, {participation}")
        self.alpha, self.participation = float(feddyn_alpha), float(participation)

    def task_options(self) -> dict[str, float]:
        return {"fedprox_mu": 0.0, "feddyn_alpha": self.alpha}

    def step(self, base, delta, state) -> tuple[Weights, Weights]:
        new_state, new = dict(state), {}
        for k, d in delta.items():
            h = state.get(f"h/{k}", 0.0) - self.alpha * self.participation * np.asarray(d, np.float64)
            new_state[f"h/{k}"] = np.asarray(h, np.float64)
            new[k] = np.asarray(base[k], np.float64) + d - h / self.alpha
        return new, new_state

"""FedProx (Li et al. 2020): FedAvg on the server; devices add (mu/2)||w - w_base||^2 to their loss."""

from __future__ import annotations

from coordinator.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, server_lr: float = 1.0, fedprox_mu: float = 0.01, **options: float):
        super().__init__(server_lr, **options)
        self.mu = float(fedprox_mu)

    def task_options(self) -> dict[str, float]:
        return {"fedprox_mu": self.mu}

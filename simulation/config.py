"""pf-sim's settings, checked before any process starts, and the coordinator options that follow.

The driver chooses the devices of each round itself (seeded, like Flower's simulation), so the
coordinator's goal is the round size; it may over-select (2x) to let replacements in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulation.shards import resolve_data


@dataclass
class SimConfig:
    devices: int = 8
    per_round: int = 4
    rounds: int = 6
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    partition: str = "iid"
    strategy: str = "fedavg"
    encoding: str = "float32"
    seed: int = 0
    data: str | None = None  # None: the embedded Fashion-MNIST subset
    workers: int = 2
    holdout: float = 0.2
    samples_per_device: int | None = None
    server_lr: float | None = None  # None: the coordinator's default (fedadam: 0.01)
    fedprox_mu: float | None = None
    model: str = "lenet"
    round_timeout: float = 600.0
    workdir: str | None = None  # None: a temporary directory, removed afterwards
    db: str | None = None
    progress: bool = True
    availability: str = "always"  # always | diurnal | a CSV file (simulation/fleet.py)
    hours_per_round: float = 4.0  # simulated hours each round advances the fleet's clock
    speed_spread: float = 0.0  # device speed heterogeneity (log-normal sigma of the slowdown)
    js_agents: int = 0  # devices 0..js_agents-1 play the TypeScript agent (node + onnxruntime-node)
    secure_aggregation: bool = False  # devices mask their deltas; the coordinator unmasks only the sum
    # with secure aggregation, this fraction of each round's devices vanishes before unmasking; without,
    # each chosen device vanishes mid-training with this probability (fleet.py)
    dropout: float = 0.0
    extra_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if not 1 <= self.per_round <= self.devices:
            raise ValueError(f"--per-round must be in 1..{self.devices} (--devices), got {self.per_round}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0 <= self.js_agents <= self.devices:
            raise ValueError(f"--js-agents must be in 0..{self.devices} (--devices), got {self.js_agents}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")
        limit = 0.5 if self.secure_aggregation else 1.0
        if not 0.0 <= self.dropout < limit:
            raise ValueError(f"--dropout must be in [0, {limit:g}), got {self.dropout}")
        if self.secure_aggregation and self.per_round < 4:
            raise ValueError(f"--secure-aggregation needs --per-round of at least 4, got {self.per_round}")
        if not 0.0 <= self.speed_spread <= 5.0:
            raise ValueError(f"--speed-spread must be in [0, 5], got {self.speed_spread}")
        if not 0.0 < self.hours_per_round <= 24.0:
            raise ValueError(f"--hours-per-round must be in (0, 24], got {self.hours_per_round}")
        if self.availability not in ("always", "diurnal") and not Path(self.availability).is_file():
            raise ValueError(f"--availability {self.availability}: not 'always', 'diurnal' or a CSV file")
        if not resolve_data(self.data).is_dir():
            raise ValueError(f"--data {self.data}: not a directory (expected an IDX dataset with a test split)")

    def describe(self) -> dict[str, Any]:
        """The settings that shape the result (the summary's "config"; paths and switches left out)."""
        return {k: v for k, v in asdict(self).items() if k not in ("workdir", "db", "progress", "extra_options")}

    def coordinator_options(self, db: str, enrollment_key: str) -> dict[str, Any]:
        server_lr = self.server_lr
        if server_lr is None and self.strategy == "fedadam":
            server_lr = 0.01  # Reddi et al.'s range; the coordinator's default 1.0 is meant for FedAvg
        return {
            "db": db,
            "model": self.model,
            "model_seed": self.seed,
            "eval_data": str(resolve_data(self.data)),
            "goal": self.per_round,
            "min_devices": min(3, self.per_round),  # the default, unless the simulated rounds are smaller
            "over_select": 2.0,
            # a realistic fleet loses devices: a round then commits at its deadline with half of K
            "min_fraction": 0.5 if (self.dropout and not self.secure_aggregation) or self.speed_spread else 1.0,
            "deadline": self.round_timeout,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "strategy": self.strategy,
            "encoding": self.encoding,
            "server_lr": server_lr,
            "fedprox_mu": self.fedprox_mu,
            "enrollment_key": enrollment_key,
            "enroll_per_address": 1_000_000,  # the whole simulated fleet enrolls from loopback
            "min_retry_after": 0,
            "max_retry_after": 2,
            "tick_interval": 0.5,
            "log_level": "warning",
            **({"secure_aggregation": True, "secagg_phase_timeout": 15.0} if self.secure_aggregation else {}),
            # the driver picks each round's devices itself (a fixed-size sample, not the coordinator's
            # Poisson admission): DP rounds are charged without amplification by sampling
            **({"dp_sampling": "unamplified"} if self.extra_options.get("dp_noise_multiplier") else {}),
            **self.extra_options,
        }

"""The strategy interface: how a round's updates become the next model.

A strategy does three things, kept apart so most of them stream:

1. **accept** each update as it arrives: the delta to keep and its weight (by default the delta
   as sent, weighted by its sample count). Wrappers change this: norm bounding clips, DP clips
   and weighs every device 1 (strategies/norm_bound.py, strategies/dp.py).
2. **aggregate** the round's deltas into one. Streaming strategies (`streaming = True`) use the
   weighted mean, kept as a `RunningSum` (weighted sum + total weight, O(model size)) that the
   server updates once per accepted update and stores in the database. Robust strategies that
   need every update at once (median, trimmed mean, Krum) set `streaming = False` and override
   `combine`; the server then keeps each delta of the round.
3. **step**: apply the combined delta to the base weights, with optional server optimizer
   state (momentum, Adam moments) that the server persists across rounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from engine.serialize.container import ContainerError, dumps, loads

Weights = dict[str, np.ndarray]


class RunningSum:
    """Sum of weight * delta and the sum of weights, in float64; the mean is sum / total."""

    def __init__(self, sums: Weights | None = None, total_weight: float = 0.0, count: int = 0):
        self.sums: Weights = dict(sums or {})
        self.total_weight = float(total_weight)
        self.count = int(count)

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        for name, value in delta.items():
            term = np.asarray(value, np.float64) * float(weight)
            self.sums[name] = self.sums[name] + term if name in self.sums else term
        self.total_weight += float(weight)
        self.count += 1

    def mean(self) -> Weights:
        if self.total_weight <= 0:
            raise ValueError("no updates to average")
        return {name: s / self.total_weight for name, s in self.sums.items()}

    def to_bytes(self) -> bytes:
        return dumps(self.sums, {"total_weight": self.total_weight, "count": self.count}, kind="aggregate")

    @classmethod
    def from_bytes(cls, data: bytes | None) -> RunningSum:
        if data is None:
            return cls()
        c = loads(data, kind="aggregate")
        return cls(c.tensors, c.metadata["total_weight"], c.metadata["count"])


@dataclass
class RoundUpdates:
    """What a round collected, for `Strategy.aggregate`: the running sum (streaming strategies) or
    every (delta, sample count) pair (the others), and each update's L2 norm as it arrived."""

    running: RunningSum | None = None
    pairs: list[tuple[Weights, float]] | None = None
    norms: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return self.running.count if self.running is not None else len(self.pairs or ())


class Strategy(ABC):
    """One federated optimization algorithm; subclasses are one small class each."""

    name: ClassVar[str]
    streaming: ClassVar[bool] = True

    def __init__(self, server_lr: float = 1.0, **_options: float):
        self.server_lr = float(server_lr)

    def task_options(self) -> dict[str, float]:
        """Extra task fields sent to devices (FedProx's mu)."""
        return {"fedprox_mu": 0.0}

    def accept(self, delta: Weights, sample_count: int) -> tuple[Weights, float]:
        """One arriving update: (the delta to keep, its weight in the mean)."""
        return delta, float(sample_count)

    def aggregate(self, updates: RoundUpdates) -> Weights:
        """The round's combined delta: the running mean, or `combine` over every update."""
        if self.streaming:
            return updates.running.mean()
        return self.combine(updates.pairs or [])

    def combine(self, updates: list[tuple[Weights, float]]) -> Weights:
        """Non-streaming strategies: all (delta, sample_count) pairs of a round -> one delta."""
        total = RunningSum()
        for delta, weight in updates:
            total.add(delta, weight)
        return total.mean()

    @abstractmethod
    def step(
        self, base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        """(base weights, combined delta, optimizer state) -> (new weights, new state), float64."""

    def published(self, weights: Mapping[str, np.ndarray], state: Weights) -> Weights:
        """The model to evaluate and hand to users, from the latest global weights and the state
        `step` returned: the weights themselves, unless a wrapper averages them (model_average.py)."""
        return dict(weights)


def state_to_bytes(state: Weights) -> bytes:
    return dumps(state, {}, kind="strategy-state")


def state_from_bytes(data: bytes | None) -> Weights:
    if data is None:
        return {}
    try:
        return loads(data, kind="strategy-state").tensors
    except ContainerError as exc:
        raise ContainerError(f"stored server optimizer state is unreadable: {exc}") from None

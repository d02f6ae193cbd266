"""Wrapper strategies, and the first of them: server-side norm bounding.

A wrapper holds another strategy and changes one step of it, as Flower's DP wrappers do: the rest
(aggregation, the server step, the task options) is the inner strategy's. `NormBounded` clips each
arriving delta to an L2 bound before the inner strategy sees it (Sun et al. 2019, "Can You Really
Backdoor Federated Learning?"), so one device's influence on any strategy is bounded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.strategies.base import RoundUpdates, Strategy, Weights
from protocol.deltas import clip_by_l2


class StrategyWrapper(Strategy):
    """Delegates everything to `inner`; subclasses override the step they change."""

    def __init__(self, inner: Strategy):
        self.inner = inner
        self.server_lr = inner.server_lr

    @property
    def name(self) -> str:  # the inner strategy's: its optimizer state is stored under this name
        return self.inner.name

    @property
    def streaming(self) -> bool:
        return self.inner.streaming

    def task_options(self) -> dict[str, float]:
        return self.inner.task_options()

    def accept(self, delta: Weights, sample_count: int) -> tuple[Weights, float]:
        return self.inner.accept(delta, sample_count)

    def aggregate(self, updates: RoundUpdates) -> Weights:
        return self.inner.aggregate(updates)

    def combine(self, updates: list[tuple[Weights, float]]) -> Weights:
        return self.inner.combine(updates)

    def step(
        self, base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        return self.inner.step(base, delta, state)

    def published(self, weights: Mapping[str, np.ndarray], state: Weights) -> Weights:
        return self.inner.published(weights, state)


class NormBounded(StrategyWrapper):
    """Every delta clipped to L2 norm `bound` as it arrives; weights as the inner strategy gives them."""

    def __init__(self, inner: Strategy, bound: float):
        super().__init__(inner)
        self.bound = float(bound)

    def accept(self, delta: Weights, sample_count: int) -> tuple[Weights, float]:
        return self.inner.accept(clip_by_l2(delta, self.bound)[0], sample_count)

"""Server model averaging: the published model is an exponential moving average of the global
models over rounds (Polyak averaging; SWA's idea applied to federated rounds), while devices keep
training from the latest global model.

On a pathological non-IID split each round's model leans toward the classes its few devices drew,
so test accuracy swings by several points from round to round; the average over rounds cancels
much of that lean. It changes nothing in training, only what is published (`Strategy.published`):

    avg_1 = w_1
    avg_t = b_t * avg_{t-1} + (1 - b_t) * w_t,   b_t = min(decay, (t - 1) / (t + 1))

The warm-up b_t lets early rounds, whose models improve fast, dominate less than a plain EMA started
at w_1 would let the first model; after 1 / (1 - decay) rounds it is a plain EMA. The average and
the count t live in the strategy state under `avg/`, beside the inner strategy's own state.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.strategies.base import Strategy, Weights
from coordinator.strategies.norm_bound import StrategyWrapper

PREFIX = "avg/"
COUNT = "avg/__rounds__"


def warmup_decay(decay: float, t: int) -> float:
    """b_t above: the weight the previous average keeps at the t-th averaged round (t >= 1)."""
    return min(decay, (t - 1) / (t + 1))


class ModelAverage(StrategyWrapper):
    """Wraps any strategy; `published` is the moving average of the models its `step` returned."""

    def __init__(self, inner: Strategy, decay: float):
        super().__init__(inner)
        if not 0 <= decay < 1:
            raise ValueError(f"server_average decay must be in [0, 1), got {decay}")
        self.decay = float(decay)

    def step(
        self, base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], state: Weights
    ) -> tuple[Weights, Weights]:
        own = {k: v for k, v in state.items() if k.startswith(PREFIX)}
        inner_state = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
        new, new_inner = self.inner.step(base, delta, inner_state)
        t = int(own[COUNT]) + 1 if COUNT in own else 1
        b = warmup_decay(self.decay, t)
        averaged = {
            k: b * np.asarray(own.get(PREFIX + k, w), np.float64) + (1 - b) * np.asarray(w, np.float64)
            for k, w in new.items()
        }
        new_state = {**new_inner, **{PREFIX + k: v for k, v in averaged.items()}, COUNT: np.asarray(t, np.float64)}
        return new, new_state

    def published(self, weights: Mapping[str, np.ndarray], state: Weights) -> Weights:
        inner = self.inner.published(weights, {k: v for k, v in state.items() if not k.startswith(PREFIX)})
        return {k: np.asarray(state.get(PREFIX + k, v), np.float64) for k, v in inner.items()}

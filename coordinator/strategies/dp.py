"""Client-level differential privacy as a wrapper strategy (Flower's
DifferentialPrivacyServerSideFixedClipping / ...AdaptiveClipping): DP-FedAvg around any mean-based
strategy. The accounting (epsilon per round, the budget) is a service: coordinator/service/privacy.py.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):

1. every accepted update's delta is clipped to L2 norm C and counts with weight 1 (a device's
   sample count would leak through the weights and unbound the sensitivity);
2. the round's mean of clipped deltas gets Gaussian noise of std z * C / n (z = noise multiplier,
   n = updates in the round), i.e. noise z * C on their sum.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"):
C follows a target quantile gamma of the update norms. Each round counts the updates whose norm was
<= C, noises that count with std sigma_b, and moves C geometrically:
C <- C * exp(-lr * (b~ - gamma)), b~ = (count + N(0, sigma_b^2)) / n. The count is a second query on
the same devices, so the delta noise is raised to z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) and the
pair costs exactly what one Gaussian query with multiplier z costs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.strategies.base import RoundUpdates, Strategy, Weights
from coordinator.strategies.norm_bound import StrategyWrapper
from protocol.deltas import clip_by_l2


def count_stddev(configured: float | None, goal: int, z: float) -> float:
    """sigma_b: as configured, else the paper's expected-cohort / 20, raised to z so that the
    split of the privacy cost between count and delta stays possible."""
    return float(configured) if configured is not None else max(goal / 20.0, z)


def delta_noise_multiplier(z: float, adaptive: bool, sigma_b: float) -> float:
    """The multiplier actually used on the delta: z, or z_delta when the count also spends budget."""
    if not adaptive:
        return z
    rest = z**-2 - (2.0 * sigma_b) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping: dp_count_stddev {sigma_b:g} must exceed dp_noise_multiplier/2 "
            f"= {z / 2:g}, or no budget is left for the delta"
        )
    return rest**-0.5


def noised_mean(
    mean: Mapping[str, np.ndarray], n: int, clip_norm: float, multiplier: float, rng: np.random.Generator
) -> Weights:
    """The mean of n clipped deltas plus N(0, (multiplier * clip_norm / n)^2) on every coordinate."""
    std = multiplier * clip_norm / max(n, 1)
    return {k: np.asarray(v, np.float64) + rng.normal(0.0, std, size=np.shape(v)) for k, v in mean.items()}


def next_clip(
    clip_norm: float,
    unclipped: int,
    n: int,
    *,
    target_quantile: float,
    lr: float,
    sigma_b: float,
    rng: np.random.Generator,
) -> float:
    """Andrew et al.'s geometric update of C from the noised fraction of unclipped updates."""
    fraction = (unclipped + rng.normal(0.0, sigma_b)) / max(n, 1)
    return float(clip_norm * math.exp(-lr * (fraction - target_quantile)))


class DifferentialPrivacy(StrategyWrapper):
    """DP-FedAvg around a mean-based strategy, for one round (C and z are that round's).

    The noise comes from `seed` (a stored secret and the round id), so a commit redone after a
    crash publishes the same weights. After `aggregate`, `next_clip_norm` holds the adapted C
    (adaptive clipping) or None."""

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float,
        noise_multiplier: float,
        seed: Sequence[int],
        adaptive: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        count_stddev: float,
    ):
        if not inner.streaming:
            raise ValueError(f"differential privacy needs a mean-based strategy; {inner.name!r} is not")
        super().__init__(inner)
        self.clip_norm, self.z = float(clip_norm), float(noise_multiplier)
        self.seed, self.adaptive = list(seed), adaptive
        self.target_quantile, self.clip_lr, self.sigma_b = target_quantile, clip_lr, count_stddev
        self.next_clip_norm: float | None = None

    def accept(self, delta: Weights, sample_count: int) -> tuple[Weights, float]:
        return clip_by_l2(delta, self.clip_norm)[0], 1.0  # bounded sensitivity: clipped, weight 1

    def aggregate(self, updates: RoundUpdates) -> Weights:
        rng = np.random.default_rng(self.seed)
        n = updates.count
        mean = self.inner.aggregate(updates)
        multiplier = delta_noise_multiplier(self.z, self.adaptive, self.sigma_b)
        noised = noised_mean(mean, n, self.clip_norm, multiplier, rng)
        if self.adaptive:
            unclipped = sum(1 for norm in updates.norms if norm <= self.clip_norm)
            self.next_clip_norm = next_clip(
                self.clip_norm,
                unclipped,
                n,
                target_quantile=self.target_quantile,
                lr=self.clip_lr,
                sigma_b=self.sigma_b,
                rng=rng,
            )
        return noised

"""The default bound on any one device's influence (issue 12): FedAvg trusts each device's delta
and sample count, so one device claiming a million samples, or sending -3w, could replace the
model. `InfluenceBounded` clips every delta to a norm bound and caps its weight, both relative to
what honest devices sent in the last committed round (its median norm and median sample count,
robust to a minority of attackers), and never beyond the model's own norm.

With no reference yet (no committed round before, or one of fewer than `MIN_REFERENCE` updates)
every device weighs the same and deltas are clipped to `model_fraction` of the model's norm. (A
first round could keep its deltas and take the limits from its own medians at commit, as the
robust strategies do; that costs a stored delta per upload, which the upload path cannot afford.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.strategies.base import Strategy, Weights
from coordinator.strategies.norm_bound import StrategyWrapper
from protocol.deltas import clip_by_l2

MIN_REFERENCE = 3  # updates a round needs before its medians are a reference
MAX_MODEL_FRACTION = 1.0  # no delta is ever longer than the model it updates


@dataclass(frozen=True)
class InfluenceLimits:
    norm_bound: float  # every delta is clipped to this L2 norm
    weight_cap: float  # and weighs at most this much (1.0: every device the same)
    reference: str  # where they came from, for the log


def influence_limits(
    base_norm: float,
    num_parameters: int,
    norms: Sequence[float],
    counts: Sequence[float],
    *,
    norm_multiple: float,
    count_multiple: float,
    model_fraction: float,
) -> InfluenceLimits:
    """The limits for a round, from the base model's L2 norm (and size) and the last committed
    round's update norms and sample counts. `model_fraction` of the model's norm bounds the first
    round's deltas; a model of all zeros counts as norm 0.01 per sqrt(parameter)."""
    scale = max(base_norm, 1e-2 * math.sqrt(max(num_parameters, 1)))
    if len(norms) < MIN_REFERENCE:
        return InfluenceLimits(model_fraction * scale, 1.0, "model (no reference round yet)")
    norm_bound = min(max(norm_multiple * float(np.median(norms)), 1e-6 * scale), MAX_MODEL_FRACTION * scale)
    weight_cap = max(1.0, count_multiple * float(np.median(counts)))
    return InfluenceLimits(norm_bound, weight_cap, f"last committed round ({len(norms)} updates)")


def bounded_by_default(config) -> bool:
    """Whether a round's config (RoundSettings) has the default influence bound: on, no explicit
    norm bound, no DP, and opened by a coordinator that knew the setting (a round stored before it
    existed goes on as it began)."""
    return (
        config.influence_bound
        and "influence_bound" in config.model_fields_set
        and config.norm_bound is None
        and not config.dp_enabled
        and not getattr(config, "secure_aggregation", False)  # there the server sees only the sum
    )


def bounded(pairs: Sequence[tuple[Weights, float]], limits: InfluenceLimits) -> list[tuple[Weights, float]]:
    """(delta, weight) pairs with each delta clipped and each weight capped."""
    return [(clip_by_l2(d, limits.norm_bound)[0], min(float(w), limits.weight_cap)) for d, w in pairs]


def round_limits(
    config, trainable: Sequence[np.ndarray], reference_norms: Sequence[float], reference_counts: Sequence[float]
) -> InfluenceLimits:
    """The limits of a round on a model with these trainable tensors, after a committed round whose
    updates had these norms and counts. `config` is the round's RoundSettings."""
    return influence_limits(
        math.sqrt(sum(float(np.dot(t.ravel(), t.ravel())) for t in trainable)),
        sum(int(t.size) for t in trainable),
        reference_norms,
        reference_counts,
        norm_multiple=config.influence_norm_multiple,
        count_multiple=config.influence_count_multiple,
        model_fraction=config.influence_model_fraction,
    )


class InfluenceBounded(StrategyWrapper):
    """Each delta clipped to `limits.norm_bound`, its weight capped at `limits.weight_cap`."""

    def __init__(self, inner: Strategy, limits: InfluenceLimits):
        super().__init__(inner)
        self.limits = limits

    def accept(self, delta: Weights, sample_count: int) -> tuple[Weights, float]:
        clipped, weight = self.inner.accept(clip_by_l2(delta, self.limits.norm_bound)[0], sample_count)
        return clipped, min(weight, self.limits.weight_cap)

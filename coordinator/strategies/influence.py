"""The default bound on any one device's influence (issue 12): FedAvg trusts each device's delta
and sample count, so one device claiming a million samples, or sending -3w, could replace the
model. `InfluenceBounded` clips every delta to a norm bound and caps its weight, both relative to
what honest devices sent in the last committed round (its median norm and median sample count,
robust to a minority of attackers), and never beyond the model's own norm.

With no reference yet (no committed round before, or one of fewer than `MIN_REFERENCE` updates)
the round is its own reference: it keeps every delta (as the robust strategies do) and applies the
limits from its own medians when it commits. A round of fewer than `MIN_REFERENCE` updates (tests,
demos: `--min-devices` below 3) weighs every device the same and clips to a small fraction of the
model's norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.strategies.base import RoundUpdates, Strategy, Weights
from coordinator.strategies.norm_bound import StrategyWrapper
from protocol.deltas import clip_by_l2, global_l2_norm

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


LimitsFrom = Callable[[Sequence[float], Sequence[float]], InfluenceLimits]


def round_limits(
    config, trainable: Sequence[np.ndarray], reference_norms: Sequence[float], reference_counts: Sequence[float]
) -> tuple[InfluenceLimits | None, LimitsFrom]:
    """For a round on a model with these trainable tensors, after a round with these update norms
    and counts: (its limits, or None when that round is no reference; how to derive limits from
    norms and counts). `config` is the round's RoundSettings."""
    base_norm = math.sqrt(sum(float(np.dot(t.ravel(), t.ravel())) for t in trainable))
    size = sum(int(t.size) for t in trainable)

    def limits_from(norms: Sequence[float], counts: Sequence[float]) -> InfluenceLimits:
        return influence_limits(
            base_norm,
            size,
            norms,
            counts,
            norm_multiple=config.influence_norm_multiple,
            count_multiple=config.influence_count_multiple,
            model_fraction=config.influence_model_fraction,
        )

    if len(reference_norms) < MIN_REFERENCE:
        return None, limits_from
    return limits_from(reference_norms, reference_counts), limits_from


class InfluenceBounded(StrategyWrapper):
    """Each delta clipped to `limits.norm_bound`, its weight capped at `limits.weight_cap`, as it
    arrives; or, with no limits yet (`limits` None), every delta kept and the limits taken from the
    round's own norms and counts (`own_limits`) when it is aggregated."""

    def __init__(
        self,
        inner: Strategy,
        limits: InfluenceLimits | None,
        own_limits: LimitsFrom | None = None,
    ):
        super().__init__(inner)
        if limits is None and own_limits is None:
            raise ValueError("InfluenceBounded needs limits, or own_limits to derive them from the round")
        self.limits, self.own_limits = limits, own_limits

    @property
    def streaming(self) -> bool:
        return self.inner.streaming and self.limits is not None

    def accept(self, delta: Weights, sample_count: int) -> tuple[Weights, float]:
        if self.limits is None:
            return self.inner.accept(delta, sample_count)
        clipped, weight = self.inner.accept(clip_by_l2(delta, self.limits.norm_bound)[0], sample_count)
        return clipped, min(weight, self.limits.weight_cap)

    def aggregate(self, updates: RoundUpdates) -> Weights:
        if self.limits is not None:
            return self.inner.aggregate(updates)
        pairs = updates.pairs or []
        limits = self.own_limits([global_l2_norm(d) for d, _ in pairs], [w for _, w in pairs])
        return self.inner.combine(bounded(pairs, limits))

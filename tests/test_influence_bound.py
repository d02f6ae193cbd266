"""The default influence bound (coordinator/strategies/influence.py): its limits and its effect on
one hostile update among honest ones."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.strategies import FedAvg, RunningSum
from coordinator.strategies.influence import InfluenceBounded, influence_limits

OPTIONS = {"norm_multiple": 3.0, "count_multiple": 3.0, "model_fraction": 0.05}


def test_without_a_reference_round_everyone_weighs_the_same_and_the_bound_is_the_models():
    limits = influence_limits(10.0, 100, [0.1, 0.2], [5, 6], **OPTIONS)  # two updates: not a reference
    assert (limits.norm_bound, limits.weight_cap) == (pytest.approx(0.5), 1.0)
    assert influence_limits(0.0, 10_000, [], [], **OPTIONS).norm_bound == pytest.approx(0.05)  # an all-zero model


def test_with_a_reference_the_medians_set_the_limits_and_the_model_caps_them():
    limits = influence_limits(10.0, 100, [0.1, 0.2, 0.3, 9e9], [50, 100, 150, 10**6], **OPTIONS)
    assert (limits.norm_bound, limits.weight_cap) == (pytest.approx(0.75), pytest.approx(375.0))
    assert influence_limits(1.0, 100, [5.0, 5.0, 5.0], [1, 1, 1], **OPTIONS).norm_bound == 1.0  # never beyond |w|


def test_a_hostile_update_moves_the_mean_by_honest_scale_only():
    rng = np.random.default_rng(0)
    w = {"w": rng.normal(0, 1, (20, 20))}
    honest = [{"w": rng.normal(0, 0.01, (20, 20))} for _ in range(9)]
    norms = [float(np.linalg.norm(d["w"])) for d in honest]
    strategy = InfluenceBounded(FedAvg(), influence_limits(20.0, 400, norms, [100] * 9, **OPTIONS))
    total = RunningSum()
    for delta, count in [({"w": -3 * w["w"]}, 10**6)] + [(d, 100) for d in honest]:
        total.add(*strategy.accept(delta, count))
    moved = float(np.linalg.norm(total.mean()["w"]))
    assert moved < 3 * max(norms)  # undefended: about 3 |w| = 60

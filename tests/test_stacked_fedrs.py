"""FedRS's restricted softmax in the stacked trainer (simulation/stacked.py): a device's logits of
the classes it lacks are scaled by alpha while it trains, so it pushes them down less."""

from __future__ import annotations

import numpy as np

from engine.models.lenet import lenet_weights
from simulation.stacked import StackedTrainer, restriction


def test_restriction_scales_exactly_the_absent_classes():
    scale = restriction(np.array([[0, 1, 1], [9, 2, 9]]), 0.25)
    assert scale.shape == (2, 1, 10)
    assert np.flatnonzero(scale[0, 0] == 1).tolist() == [0, 1]
    assert np.flatnonzero(scale[1, 0] == 1).tolist() == [2, 9]
    assert set(scale[:, 0].ravel()) == {1.0, 0.25}
    assert (restriction(np.array([[3, 4]]), None) == 1).all()  # off: every logit as it is


def test_restricted_training_moves_absent_classes_less_and_alpha_one_is_plain():
    rng = np.random.default_rng(0)
    data = [(rng.random((12, 1, 28, 28)).astype(np.float32), np.array([0, 1] * 6)) for _ in range(2)]
    base = lenet_weights(0)
    plain = StackedTrainer(0.05, 0.0, 4).train(base, data, [1, 2], 1)
    ones = StackedTrainer(0.05, 0.0, 4).train(base, data, [1, 2], 1, restrict=1.0)
    shared = StackedTrainer(0.05, 0.0, 4)  # one graph: a restricted call, then an unrestricted one
    restricted = shared.train(base, data, [1, 2], 1, restrict=0.1)
    again = shared.train(base, data, [1, 2], 1)
    for k in base:
        np.testing.assert_array_equal(plain[0][k], ones[0][k])
        np.testing.assert_allclose(plain[1][k], again[1][k], atol=1e-6)  # the scales reset each call
    absent = np.arange(2, 10)
    moved = [np.linalg.norm(d["fc3.weight"][:, absent]) for d in (plain[0], restricted[0])]
    assert moved[1] < 0.3 * moved[0]  # the absent classes' columns barely move
    assert np.linalg.norm(restricted[0]["fc3.weight"][:, :2]) > 0.3 * np.linalg.norm(plain[0]["fc3.weight"][:, :2])

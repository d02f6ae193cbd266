"""Server model averaging (coordinator/strategies/model_average.py): the published model is a
warmed-up moving average of the global models; training and the inner strategy are untouched."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.strategies import FedAvgM, ModelAverage, make_strategy
from coordinator.strategies.base import state_from_bytes, state_to_bytes
from coordinator.strategies.model_average import warmup_decay
from simulation.stacked_sim import StackedOptions, StackedSimulation
from tests.test_sim_stacked import small_config


def test_warmup_decay_starts_uniform_then_is_the_decay():
    assert [warmup_decay(0.9, t) for t in (1, 2, 3, 4)] == pytest.approx([0.0, 1 / 3, 2 / 4, 3 / 5])
    assert warmup_decay(0.9, 100) == 0.9 and warmup_decay(0.5, 4) == 0.5


def test_published_model_is_the_hand_computed_average_and_survives_storage():
    strategy = ModelAverage(make_strategy({"strategy": "fedavg"}), decay=0.5)
    weights, state = {"w": np.array([0.0, 0.0])}, {}
    assert strategy.published(weights, state)["w"].tolist() == [0.0, 0.0]  # nothing averaged yet
    history = []
    for delta in ([4.0, -2.0], [2.0, 2.0], [6.0, 0.0]):
        weights, state = strategy.step(weights, {"w": np.array(delta)}, state)
        state = state_from_bytes(state_to_bytes(state))  # as the coordinator stores it between rounds
        history.append(weights["w"].copy())
    w1, w2, w3 = history
    assert w3.tolist() == [12.0, 0.0]  # training is plain FedAvg: the latest model, not the average
    avg2 = (1 / 3) * w1 + (2 / 3) * w2  # b_2 = 1/3
    avg3 = 0.5 * avg2 + 0.5 * w3  # b_3 = min(0.5, 2/4)
    assert strategy.published(weights, state)["w"] == pytest.approx(avg3)
    assert int(state["avg/__rounds__"]) == 3


def test_inner_strategy_state_and_weights_are_untouched():
    base, deltas = {"w": np.ones(3)}, [{"w": np.full(3, d)} for d in (0.5, -0.2, 0.1)]
    plain, wrapped = FedAvgM(server_momentum=0.9), ModelAverage(FedAvgM(server_momentum=0.9), decay=0.8)
    pw, ps, ww, ws = base, {}, base, {}
    for delta in deltas:
        pw, ps = plain.step(pw, delta, ps)
        ww, ws = wrapped.step(ww, delta, ws)
    np.testing.assert_array_equal(pw["w"], ww["w"])
    np.testing.assert_array_equal(ps["v/w"], ws["v/w"])  # the momentum, beside the average
    assert not np.allclose(wrapped.published(ww, ws)["w"], ww["w"])


def test_decay_must_be_below_one():
    with pytest.raises(ValueError, match="decay"):
        ModelAverage(make_strategy({"strategy": "fedavg"}), decay=1.0)


def test_stacked_simulation_evaluates_the_published_average():
    records, options = [], StackedOptions(server_average=0.9)
    sim = StackedSimulation(small_config(rounds=2), emit=records.append, options=options)
    summary = sim.run()
    assert isinstance(sim.strategy_, ModelAverage)
    published = sim.strategy_.published(sim.weights, sim.server_state)
    assert not np.allclose(published["fc3.weight"], sim.weights["fc3.weight"])  # the average, not the latest
    assert summary["final_accuracy"] > summary["initial_accuracy"]
    assert [r["latest_accuracy"] for r in records] == summary["latest_accuracy_by_round"]
    assert records[0]["latest_accuracy"] == records[0]["accuracy"]  # round 1: the average is that model

"""pf-sim --stacked: stacked training is the per-device math; the in-process loop runs and encodes."""

from __future__ import annotations

import numpy as np
import pytest

from engine.data.dataview import ArrayDataset
from engine.models import build_lenet
from engine.models.lenet import lenet_weights
from engine.optimizer import SGD
from engine.trainer import Trainer
from simulation.cli import main as pf_sim
from simulation.config import SimConfig
from simulation.stacked import StackedTrainer, stack_weights, unstack_weights
from simulation.stacked_sim import StackedOptions, StackedSimulation


def test_stack_and_unstack_are_inverse():
    base = lenet_weights(3)
    for weights in unstack_weights(stack_weights(base, 4), 4):
        assert set(weights) == set(base)
        for name, value in base.items():
            np.testing.assert_array_equal(weights[name], value)


def test_stacked_training_gives_each_devices_own_deltas():
    rng = np.random.default_rng(0)
    devices, n, batch, epochs, seeds = 3, 13, 5, 2, [11, 12, 13]  # 13 % 5: a short last batch too
    data = [(rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)) for _ in range(devices)]
    base = lenet_weights(1)
    stacked = StackedTrainer(lr=0.05, momentum=0.5, batch_size=batch).train(base, data, seeds, epochs)
    for d in range(devices):
        model = build_lenet()
        model.load_state_dict(base)
        trainer = Trainer(model, optimizer=SGD(lr=0.05, momentum=0.5), batch_size=batch, seed=seeds[d])
        trainer.fit(ArrayDataset(*data[d]), epochs)
        trained = trainer.get_weights()
        for name in base:
            expected = trained[name] - base[name]
            assert np.abs(expected).max() > 0
            np.testing.assert_allclose(stacked[d][name], expected, atol=1e-6, rtol=1e-4)


def test_stacked_trainer_reuses_its_graph_and_resets_momentum():
    rng = np.random.default_rng(1)
    data = [(rng.random((6, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 6)) for _ in range(2)]
    trainer, base = StackedTrainer(lr=0.05, momentum=0.9, batch_size=3), lenet_weights(0)
    first = trainer.train(base, data, [1, 2], 1)
    second = trainer.train(base, data, [1, 2], 1)  # same start: same result, no momentum carried over
    for a, b in zip(first, second, strict=True):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-7)


def test_stacked_trainer_refuses_unequal_devices():
    data = [
        (np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, int)),
        (np.zeros((5, 1, 28, 28), np.float32), np.zeros(5, int)),
    ]
    with pytest.raises(ValueError, match="equal-sized"):
        StackedTrainer(0.05, 0.0, 2).train(lenet_weights(0), data, [0, 1], 1)


def small_config(**changes) -> SimConfig:
    settings = dict(devices=4, per_round=2, rounds=2, epochs=1, batch_size=10, samples_per_device=50, workers=1)
    settings.update(changes)
    return SimConfig(progress=False, **settings)


def test_stacked_simulation_rounds_and_compressed_updates():
    records = []
    dense = StackedSimulation(small_config(), emit=records.append).run()
    assert [r["round"] for r in records] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert dense["final_accuracy"] > dense["initial_accuracy"]
    small = StackedSimulation(small_config(encoding="int8", rounds=1), options=StackedOptions(topk_fraction=0.05)).run()
    assert small["bytes_up"] * 8 < dense["bytes_up"] / 2  # one round of int8 top-5% against two of float32


def test_pf_sim_stacked_refuses_what_needs_a_coordinator(capsys):
    assert pf_sim(["--stacked", "--chaos-agent-kills", "1"]) == 2
    assert "--stacked" in capsys.readouterr().err
    assert pf_sim(["--stacked", "--strategy", "fedprox"]) == 2

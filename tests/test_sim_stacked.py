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
    cosine = StackedOptions(lr_schedule="cosine", lr_final=0.5)
    dense = StackedSimulation(small_config(lr=0.04), emit=records.append, options=cosine).run()
    assert [r["round"] for r in records] == [1, 2]
    assert [r["lr"] for r in records] == pytest.approx([0.04, 0.04 * (0.5 + 0.5 * 0.5)])  # the schedule's lrs
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in records)
    assert dense["final_accuracy"] > dense["initial_accuracy"]
    small = StackedSimulation(small_config(encoding="int8", rounds=1), options=StackedOptions(topk_fraction=0.05)).run()
    assert small["bytes_up"] * 8 < dense["bytes_up"] / 2  # one round of int8 top-5% against two of float32


def test_pf_sim_stacked_refuses_what_needs_a_coordinator(capsys):
    assert pf_sim(["--stacked", "--chaos-agent-kills", "1"]) == 2
    assert "--stacked" in capsys.readouterr().err
    assert pf_sim(["--stacked", "--strategy", "fedprox"]) == 2


def test_compression_bench_reports_bytes_and_accuracy_per_encoding():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "bench/compression.py", "--rounds", "1", "--data", "", "--workers", "1", "--json",
         "--encodings", "float32,int4,int4+topk0.1,int4-bitmap+topk0.5"],
        cwd=root, capture_output=True, text=True, timeout=300, check=True,
    ).stdout.splitlines()[-1]  # fmt: skip
    result = json.loads(out)
    by_name = {e["encoding"]: e for e in result["encodings"]}
    assert by_name["float32"]["fraction_of_float32"] == 1.0
    assert 0.125 < by_name["int4"]["fraction_of_float32"] < 0.14  # dense 4-bit: 1/8 plus the header
    assert by_name["int4+topk0.1"]["fraction_of_float32"] < 0.125
    assert by_name["int4-bitmap+topk0.5"]["fraction_of_float32"] < 0.125  # half the entries, 1 bit each for where
    assert all(0.0 <= e["final_accuracy"] <= 1.0 for e in result["encodings"])


def test_feddyn_server_step_follows_acar_et_al():
    from coordinator.strategies import make_strategy

    strategy = make_strategy({"strategy": "feddyn", "feddyn_alpha": 0.1, "participation": 0.5})
    base, delta = {"w": np.array([1.0, 2.0])}, {"w": np.array([0.2, -0.4])}
    new, state = strategy.step(base, delta, {})
    h = -0.1 * 0.5 * delta["w"]
    np.testing.assert_allclose(state["h/w"], h)
    np.testing.assert_allclose(new["w"], base["w"] + delta["w"] - h / 0.1)  # = base + 1.5 * delta
    again, state = strategy.step(new, delta, state)
    np.testing.assert_allclose(again["w"], new["w"] + delta["w"] - 2 * h / 0.1)


def test_feddyn_device_terms_pull_towards_the_base_and_stack_consistently():
    rng = np.random.default_rng(0)
    data = [(rng.random((12, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 12)) for _ in range(2)]
    base = lenet_weights(0)
    states = [{k: (0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()} for _ in range(2)]
    plain = StackedTrainer(0.05, 0.0, 4).train(base, data, [1, 2], 2)
    dyn = StackedTrainer(0.05, 0.0, 4).train(base, data, [1, 2], 2, feddyn=(0.5, states))
    for d in range(2):
        alone = StackedTrainer(0.05, 0.0, 4).train(base, [data[d]], [1 + d], 2, feddyn=(0.5, [states[d]]))[0]
        for name in base:
            np.testing.assert_allclose(dyn[d][name], alone[name], atol=1e-6)
        assert any(np.abs(dyn[d][k] - plain[d][k]).max() > 1e-3 for k in base)
    zero = [{k: np.zeros_like(v) for k, v in base.items()}] * 2
    pulled = StackedTrainer(0.05, 0.0, 4).train(base, data, [1, 2], 2, feddyn=(5.0, zero))
    for d in range(2):  # a strong alpha with g = 0 keeps each device nearer the base
        size = sum(float(np.sum(np.square(v))) for v in plain[d].values())
        assert sum(float(np.sum(np.square(v))) for v in pulled[d].values()) < size


def test_feddyn_only_where_devices_run_it(capsys):
    from coordinator.settings import RoundSettings
    from coordinator.strategies import make_strategy

    settings = RoundSettings(strategy="feddyn", feddyn_alpha=0.02)
    assert make_strategy(settings).task_options() == {"fedprox_mu": 0.0, "feddyn_alpha": 0.02}  # Python agents run it
    with pytest.raises(ValueError, match="secure aggregation"):
        RoundSettings(strategy="feddyn", secure_aggregation=True)  # the masked path keeps no g_k
    assert pf_sim(["--strategy", "feddyn", "--js-agents", "1"]) == 2
    assert "TypeScript" in capsys.readouterr().err
    summary = StackedSimulation(small_config(strategy="feddyn", rounds=2)).run()
    assert summary["final_accuracy"] > summary["initial_accuracy"]


def test_cosine_lr_schedule_math():
    import math

    from coordinator.strategies.lr_schedule import round_lr

    assert [round_lr(0.05, r, 10) for r in (1, 5, 10)] == [0.05] * 3
    assert round_lr(0.05, 1, 50, "cosine", 0.1) == pytest.approx(0.05)
    assert round_lr(0.05, 26, 50, "cosine", 0.1) == pytest.approx(0.05 * (0.1 + 0.9 * 0.5))  # halfway
    assert round_lr(0.05, 50, 50, "cosine", 0.1) == pytest.approx(0.05 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.98))))
    lrs = [round_lr(1.0, r, 20, "cosine") for r in range(1, 21)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))
    with pytest.raises(ValueError, match="schedule 'step'"):
        round_lr(0.05, 1, 10, "step")
    with pytest.raises(ValueError, match="round <= rounds"):
        round_lr(0.05, 11, 10, "cosine")
    with pytest.raises(SystemExit):
        pf_sim(["--stacked", "--lr-schedule", "step"])


def test_stacked_trainer_lr_override_is_that_lr():
    rng = np.random.default_rng(2)
    data = [(rng.random((8, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 8)) for _ in range(2)]
    base, states = lenet_weights(0), [{k: np.full_like(v, 0.01) for k, v in lenet_weights(0).items()}] * 2
    shared = StackedTrainer(0.05, 0.0, 4)
    shared.train(base, data, [1, 2], 1)  # a first call at 0.05 must not leak into the next
    for feddyn in (None, (0.3, states)):
        overridden = shared.train(base, data, [1, 2], 1, feddyn=feddyn, lr=0.02)
        fresh = StackedTrainer(0.02, 0.0, 4).train(base, data, [1, 2], 1, feddyn=feddyn)
        for a, b in zip(overridden, fresh, strict=True):
            for name in a:
                np.testing.assert_allclose(a[name], b[name], atol=1e-7)

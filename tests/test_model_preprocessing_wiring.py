"""The preprocessing a model records is what every party applies: the agent's training and
held-out evaluation, the coordinator's evaluation, and a federated run of an imported ONNX model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.models import model_view
from engine.data import Preprocessing, Subset, load_default, record_preprocessing
from engine.models import build

REPO = Path(__file__).resolve().parents[1]


def raw_pixels(indices: list[int]) -> np.ndarray:
    """The embedded images at `indices`, scaled to [0, 1] with no normalization."""
    x, _ = Preprocessing.parse("none").view(load_default("train")).get_batch(np.asarray(indices))
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
    return x


def test_a_devices_shard_is_preprocessed_once_as_its_model_records():
    shard = Subset(load_default("train"), [3, 1, 4])  # a device's part of an IDX directory (MNIST-normalized)
    model = build("lenet", seed=0)
    record_preprocessing(model, Preprocessing.parse("none"))
    x, _ = model_view(model, shard).get_batch(np.arange(3))
    np.testing.assert_allclose(x, raw_pixels([3, 1, 4]), atol=1e-6)  # [0, 1] pixels, not normalized twice
    record_preprocessing(model, Preprocessing.parse("0.5,0.25"))
    x, _ = model_view(model, shard).get_batch(np.arange(3))
    np.testing.assert_allclose(x, (raw_pixels([3, 1, 4]) - 0.5) / 0.25, atol=1e-5)


def test_the_coordinators_evaluation_applies_the_models_preprocessing(tmp_path):
    from coordinator.service.evaluation import engine_evaluator
    from engine.serialize.modelfile import dumps
    from engine.trainer import evaluate_model

    model = build("lenet", seed=0)
    record_preprocessing(model, Preprocessing.parse("none"))
    served = engine_evaluator(str(REPO / "engine/data/embedded"))(dumps(model))
    expected = evaluate_model(model, load_default("test"), preprocessing="none")
    as_mnist = evaluate_model(model, load_default("test"), preprocessing="mnist")
    assert served == pytest.approx(expected) and served["loss"] != pytest.approx(as_mnist["loss"])


@pytest.mark.slow
def test_pf_sim_federates_an_onnx_model_the_agents_train(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(
        net, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
        input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "--model", str(path), "--devices", "4", "--per-round", "2"]
        + ["--rounds", "2", "--epochs", "1", "--samples-per-device", "150", "--json", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    accuracy = summary["accuracy_by_round"]
    assert len(accuracy) == 2 and accuracy[-1] > 0.3  # an untrained 10-way MLP scores ~0.1


def test_uint8_photos_are_scaled_to_unit_pixels_before_normalization():
    photos = np.array([[[0, 128, 255]]], np.uint8)[None]  # (1, 1, 1, 3)
    for spec in ("none", "mnist", "0.5,0.25"):
        prep = Preprocessing.parse(spec)
        np.testing.assert_allclose(prep.apply(photos), prep.apply(photos.astype(np.float32) / 255.0), rtol=1e-6)
    assert Preprocessing.parse("none").apply(photos).max() == 1.0

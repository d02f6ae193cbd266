"""LeNet from raw operators: its structure, one step against PyTorch, and the loss falling on real data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import SGD
from engine.data import load_default
from engine.models import build
from engine.trainer import Trainer

BATCH = 32
STEPS = 60
PARITY = Path(__file__).resolve().parents[1] / "bench" / "parity_torch.py"


@pytest.fixture(scope="module")
def train_set():
    return load_default("train")


def test_lenet_is_built_from_raw_operators():
    model = build("lenet", seed=0)
    kinds = {node.op.type_name for node in model.graph.nodes}
    assert {"Convolution", "Pooling", "MatrixMul", "Relu", "Reshape", "Host2DeviceCopy"} <= kinds
    shapes = {name: var.shape for name, var in model.params.items()}
    assert shapes == {
        "conv1.weight": (6, 1, 5, 5),
        "conv1.bias": (6, 1, 1),
        "conv2.weight": (16, 6, 5, 5),
        "conv2.bias": (16, 1, 1),
        "fc1.weight": (400, 120),
        "fc1.bias": (120,),
        "fc2.weight": (120, 84),
        "fc2.bias": (84,),
        "fc3.weight": (84, 10),
        "fc3.bias": (10,),
    }
    assert model.output.shape == (None, 10)
    assert model.num_parameters() == 61706  # the classic LeNet-5 count with a padded first conv
    # The seed decides the weights: same seed, same model; another seed, another model.
    same, other = build("lenet", seed=0).state_dict(), build("lenet", seed=1).state_dict()
    assert all(np.array_equal(same[k], v) for k, v in model.state_dict().items())
    assert not np.array_equal(other["fc1.weight"], same["fc1.weight"])


def test_loss_falls_on_the_embedded_subset(train_set):
    trainer = Trainer(build("lenet", seed=0), optimizer=SGD(0.05, momentum=0.9), batch_size=BATCH)
    order = np.random.default_rng(0).permutation(train_set.size())[: STEPS * BATCH]
    losses = []
    for k in range(STEPS):
        x, y = train_set.get_batch(order[k * BATCH : (k + 1) * BATCH])
        losses.append(trainer.step(x, y)[0])
    assert np.isfinite(losses).all()
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert abs(start - np.log(10)) < 0.3, f"an untrained 10-class model should start near ln 10, got {start}"
    assert end < 0.75 * start, f"loss did not fall clearly: first five {start:.3f}, last ten {end:.3f}"
    held_out = load_default("test", limit=500)
    assert trainer.evaluate(held_out)["accuracy"] > 0.4  # chance is 0.1


def _parity_module():
    spec = importlib.util.spec_from_file_location("parity_torch", PARITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_steps_match_torch(train_set):
    """The bench's weight copy and the engine agree step by step (the full run is bench/parity_torch.py)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    model = build("lenet", seed=3)
    net = _parity_module().torch_lenet(torch, model.state_dict())
    trainer = Trainer(model, optimizer=SGD(0.05, weight_decay=5e-4, momentum=0.9), batch_size=BATCH)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for k in range(3):
        x, y = train_set.get_batch(np.arange(k * BATCH, (k + 1) * BATCH))
        loss, logits = trainer.step(x, y)
        opt.zero_grad()
        torch_logits = net(torch.from_numpy(x))
        torch_loss = torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(y))
        torch_loss.backward()
        opt.step()
        np.testing.assert_allclose(logits, torch_logits.detach().numpy(), rtol=1e-4, atol=1e-5)
        assert abs(loss - float(torch_loss.detach())) <= 1e-5 * abs(loss)
    fc1 = dict(net.named_parameters())["7.weight"].detach().numpy().T
    np.testing.assert_allclose(model.params["fc1.weight"].value, fc1, rtol=1e-4, atol=1e-6)


# ----- bench/parity_torch.py as a user runs it -----


def test_parity_bench_exits_2_without_torch():
    blocker = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['parity_torch.py', '--json']; "
        f"runpy.run_path({str(PARITY)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "PyTorch is not installed" in proc.stderr


def test_parity_bench_prints_the_documented_json_line():
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, str(PARITY), "--json", "--quiet", "--max-steps", "12", "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) >= {"steps", "max_rel_loss_diff_first10", "engine_test_accuracy", "torch_test_accuracy"}
    assert result["steps"] == 12
    assert result["max_rel_loss_diff_first10"] <= 1e-4

"""The TypeScript agent (device_agent/js): its own test suite (`npm test`), and interoperability with the
Python side on real files: updates it encodes decode in protocol.update (byte for byte what Python
encodes), numpy's .npz files read in its reader, onnxruntime-node runs after `npm ci --ignore-scripts`,
and the agent passes the conformance suite.

Skipped, with the reason, only where Node.js/npm are not installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.models import build_model_bytes
from engine.serialize.container import loads, save
from protocol.update import decode_update, encode_update

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "device_agent" / "js"
NODE, NPM = shutil.which("node"), shutil.which("npm")

pytestmark = pytest.mark.skipif(
    not (NODE and NPM), reason="Node.js and npm are not installed: the TypeScript agent (device_agent/js) is not tested"
)


def run(args: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=JS, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def built() -> Path:
    """node_modules from the lock file (install scripts off: onnxruntime-node ships its CPU binaries), then tsc."""
    if not (JS / "node_modules" / "onnxruntime-node").exists():
        installed = run([NPM, "ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        assert installed.returncode == 0, installed.stderr[-3000:]
    compiled = run([NPM, "run", "build"])
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    return JS


def interop(*args: str) -> str:
    done = run([NODE, "dist/test/tools/interop.js", *args], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_npm_test_passes_and_the_sources_are_formatted(built):
    formatted = run([NPM, "run", "format:check"])
    assert formatted.returncode == 0, formatted.stdout[-3000:] + formatted.stderr[-2000:]
    done = run([NPM, "test"])
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    passed = re.search(r"pass (\d+)", done.stdout)
    assert re.search(r"fail 0\b", done.stdout) and passed and int(passed.group(1)) >= 30, done.stdout[-3000:]


def test_ts_encoded_updates_decode_in_python_byte_for_byte(built, tmp_path):
    """A LeNet-sized delta encoded by TypeScript is what Python encodes: same tensor bytes, same scales."""
    base = loads(build_model_bytes("lenet", seed=0)).tensors
    other = loads(build_model_bytes("lenet", seed=1)).tensors
    names = loads(build_model_bytes("lenet", seed=0)).metadata["trainable"]
    delta = {n: ((other[n] - base[n]) * np.float32(0.01)).astype(np.float32) for n in names}
    save(tmp_path / "delta.pft", delta, kind="tensors")
    interop("encode", str(tmp_path / "delta.pft"), str(tmp_path))
    shapes = {n: delta[n].shape for n in names}
    for encoding in ("float32", "float16", "int8"):
        for topk in (None, 0.1):
            ts = (tmp_path / f"{encoding}{'-topk' if topk else ''}.pfu").read_bytes()
            update = decode_update(ts, expected=shapes)  # the Python decoder accepts it
            assert (update.sample_count, update.round_id, update.base_version) == (42, 7, 3)
            assert update.encoding == encoding and update.sparse == (topk is not None)
            assert update.metrics == {"train_loss": 1.25, "steps": 9.0}
            py = encode_update(
                delta,
                sample_count=42,
                round_id=7,
                base_version=3,
                metrics={"train_loss": 1.25, "steps": 9},
                encoding=encoding,
                topk_fraction=topk,
            )
            ts_c, py_c = loads(ts), loads(py)
            assert ts_c.tensors.keys() == py_c.tensors.keys()
            for name in py_c.tensors:
                assert ts_c.tensors[name].dtype == py_c.tensors[name].dtype, name
                assert ts_c.tensors[name].tobytes() == py_c.tensors[name].tobytes(), f"{encoding} {topk} {name}"
            assert ts_c.metadata["tensors"] == py_c.metadata["tensors"]  # shapes, encodings, int8 scales
            expected = decode_update(py).delta
            assert all(np.array_equal(update.delta[n], expected[n]) for n in names)


def test_the_npz_reader_reads_numpy_files(built, tmp_path):
    from engine.data import load_default

    x, y = load_default("train").get_batch(np.arange(20))
    np.savez(tmp_path / "plain.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    np.savez_compressed(tmp_path / "deflated.npz", x=x.astype(np.float64), y=y.astype(np.uint8))
    for name in ("plain.npz", "deflated.npz"):
        seen = json.loads(interop("npz", str(tmp_path / name)))
        assert seen["size"] == 20 and seen["itemShape"] == [1, 28, 28] and seen["y"] == y.tolist()
        assert seen["xSum"] == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-6)
        assert seen["x0"] == pytest.approx(x.reshape(-1)[:5].tolist(), rel=1e-6)
    np.savez(tmp_path / "no-y.npz", x=x)
    args = ["--coordinator", "http://127.0.0.1:9", "--state-dir", str(tmp_path / "s"), "--enrollment-key", "k"]
    refused = run([NODE, "dist/cli.js", "run", *args, "--data", str(tmp_path / "no-y.npz")])
    assert refused.returncode == 2 and "cannot read --data" in refused.stderr and "'x' and 'y'" in refused.stderr


def test_the_agent_feeds_raw_pixels_as_the_model_records_bit_for_bit(built, tmp_path):
    """uint8 pixels in a .npz, preprocessed by the TS agent from the model file's record: exactly what
    the Python side feeds (LeNet's default mnist, a record with padding, an imported ONNX model whose
    (28, 28) input takes each image's rows as steps)."""
    from engine import nn
    from engine.data import Preprocessing, load_default, preprocessing_for, record_preprocessing
    from engine.serialize.modelfile import dumps
    from engine.serialize.modelfile import loads as load_model

    raw = load_default("train").raw[:6][:, None]  # (6, 1, 28, 28) uint8
    np.savez(tmp_path / "raw.npz", x=raw, y=np.arange(6))
    padded = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10)).build((1, 32, 32))
    record_preprocessing(padded, Preprocessing((0.5,), (0.25,), 2))
    rows = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).build((28, 28))
    rows.metadata["source"] = "onnx"
    for name, model_bytes in [
        ("lenet", build_model_bytes("lenet")),
        ("padded", dumps(padded)),
        ("rows", dumps(rows)),
    ]:
        (tmp_path / f"{name}.pfm").write_bytes(model_bytes)
        interop("preprocess", str(tmp_path / f"{name}.pfm"), str(tmp_path / "raw.npz"), str(tmp_path / "fed.pft"))
        fed = loads((tmp_path / "fed.pft").read_bytes()).tensors["x"]
        model = load_model(model_bytes)
        expected = preprocessing_for(model).apply(raw)
        expected = expected.reshape(len(raw), *model.input.shape[1:])
        assert fed.dtype == np.float32 and fed.shape == expected.shape, name
        assert np.array_equal(fed, expected), f"{name}: max diff {np.abs(fed - expected).max()}"


def test_onnxruntime_node_runs_after_npm_ci_ignore_scripts(built, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "tiny.onnx")
    out = json.loads(interop("ort", str(tmp_path / "tiny.onnx")))
    x = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    assert out["dims"] == [2, 3]
    assert np.allclose(out["data"], np.maximum(x @ w, 0).reshape(-1), rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd-momentum", "adam"])
def test_ts_training_with_the_onnx_step_matches_the_engine(built, tmp_path, optimizer):
    """The TS trainer (onnxruntime-node running the exported step) and the engine's Trainer take the
    same 12 steps on the same Fashion-MNIST batches: losses and weights agree to float32 rounding."""
    pytest.importorskip("onnx")
    from engine import load_model_bytes
    from engine.data import load_default
    from engine.onnx import export_training_step
    from engine.optimizer import make_optimizer
    from engine.trainer import Trainer

    model_bytes = build_model_bytes("lenet", seed=3)
    (tmp_path / "model.pfm").write_bytes(model_bytes)
    # Adam at its usual scale of learning rate: at 0.05 its steps amplify float32 summation-order noise
    # (which differs with BLAS thread counts) to the edge of the 1e-5 bound
    lr, batch, epochs = {"sgd-momentum": 0.05, "adam": 0.005}[optimizer], 16, 2
    export_training_step(load_model_bytes(model_bytes), tmp_path / "step.onnx", optimizer=optimizer, lr=lr)
    x, y = load_default("train").get_batch(np.arange(96))
    np.savez(tmp_path / "data.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    interop(
        "train", *(str(tmp_path / n) for n in ("model.pfm", "step.onnx", "data.npz", "out.pft")), "2", "16", str(lr)
    )
    ts = loads((tmp_path / "out.pft").read_bytes())

    trainer = Trainer(load_model_bytes(model_bytes), optimizer=make_optimizer(optimizer, lr), batch_size=batch)
    losses = [trainer.step(x[i : i + batch], y[i : i + batch])[0] for _ in range(epochs) for i in range(0, 96, batch)]
    assert np.allclose(ts.metadata["losses"], losses, rtol=1e-5, atol=1e-6)
    weights = trainer.get_weights()
    base = loads(model_bytes).tensors
    for name, value in ts.tensors.items():
        change_ts, change_engine = value - base[name], weights[name] - base[name]
        # relative in norm, as tests/test_training_step_onnx.py measures engine vs onnxruntime: Adam divides
        # by sqrt(v), so single elements with a near-zero gradient amplify float32 summation-order noise
        assert np.linalg.norm(value - weights[name]) <= 1e-5 * np.linalg.norm(weights[name]), name
        assert np.linalg.norm(change_ts - change_engine) <= 1e-4 * np.linalg.norm(change_engine), name


def test_ts_training_feeds_dropout_masks_and_carries_batch_norm_statistics(built, tmp_path):
    """A model with batch norm and dropout (tests/training_step_models.py): the TS trainer reads the masks'
    probability from the step's ONNX metadata, draws them per step, carries the running statistics, and
    the loss falls over three epochs of real data."""
    pytest.importorskip("onnx")
    from training_step_models import conv_net

    from engine.data import load_default
    from engine.onnx import export_training_step
    from engine.serialize.modelfile import dumps

    model = conv_net(seed=1)
    (tmp_path / "model.pfm").write_bytes(dumps(model))
    export_training_step(model, tmp_path / "step.onnx", optimizer="sgd-momentum", lr=0.05)
    x, y = load_default("train").get_batch(np.arange(256))
    np.savez(tmp_path / "data.npz", x=x.astype(np.float32), y=y.astype(np.int64))
    interop("train", *(str(tmp_path / n) for n in ("model.pfm", "step.onnx", "data.npz", "out.pft")), "3", "32", "0.05")
    out = loads((tmp_path / "out.pft").read_bytes())
    losses = np.asarray(out.metadata["losses"])
    assert len(losses) == 24 and np.all(np.isfinite(losses))
    assert losses[-8:].mean() < losses[:8].mean() - 0.1, losses
    base = loads(dumps(model)).tensors
    stats = [n for n in out.tensors if "running" in n]
    assert stats and all(not np.array_equal(out.tensors[n], base[n]) for n in stats), stats


def test_the_js_agent_passes_the_conformance_suite(built):
    from protocol.conformance import SCENARIOS

    command = (
        f"{NODE} {JS / 'dist' / 'cli.js'} run --coordinator {{url}} --enrollment-key {{key}} "
        "--state-dir {state} --data {data} --once"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "protocol.conformance", "--agent", "pf-agent-js", "--agent-cmd", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == [], proc.stdout[-5000:]
    assert summary["passed"] == [c.name for c in SCENARIOS]


def test_a_mixed_fleet_federates_one_model(built, tmp_path):
    """pf-sim --js-agents: Python and TypeScript devices train the same model round after round; the
    TypeScript ones get raw uint8 pixels and the served training step, and both kinds are accepted."""
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "--devices", "4", "--per-round", "4", "--rounds", "3", "--lr", "0.01"]
        + ["--js-agents", "2", "--samples-per-device", "300", "--json", "--no-progress", "--workdir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = lines[-1]
    assert [r["accepted_by_agent"] for r in lines[:-1]] == [{"python": 2, "js": 2}] * 3
    assert summary["accepted_by_agent"] == {"python": 6, "js": 6}
    accuracy = summary["accuracy_by_round"]  # (lr 0.01: 300 samples a device at 0.05 oscillate, Python's too)
    assert accuracy[-1] > accuracy[0] > summary["initial_accuracy"] and accuracy[-1] > summary["initial_accuracy"] + 0.3
    shard = np.load(tmp_path / "js-shards" / "device-00000.npz")
    assert shard["x"].dtype == np.uint8 and shard["x"].shape == (300, 1, 28, 28)
    assert (tmp_path / "devices" / "device-00000" / "step.onnx").exists()  # it trained with the served step


def test_pf_sim_names_a_bad_js_agents_count():
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "--devices", "3", "--per-round", "2", "--js-agents", "4"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--js-agents must be in 0..3" in proc.stderr
    stacked = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "--stacked", "--js-agents", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stacked.returncode == 2 and "no --js-agents" in stacked.stderr


def test_bench_training_step_node_prints_its_json_line(built):
    """bench/training_step_node.py at a tiny size: each side's step time, the file sizes, both agents'
    round memory (a real round each), one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "bench/training_step_node.py", "--json", "--steps", "3", "--warmup", "1"]
        + ["--batches", "8", "--samples", "64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    (run,) = summary["runs"]
    assert all(run[f"{side}_ms"] > 0 for side in ("engine", "onnxruntime_python", "onnxruntime_node"))
    (files,) = summary["files"]
    assert files["step_bytes"] < files["inference_onnx_bytes"] < files["step_with_initial_values_bytes"]
    memory = summary["round_memory"]
    assert memory["js_round_status"] == memory["python_round_status"] == "committed"
    assert memory["js_agent_peak_rss_mib"] > 10 and memory["python_agent_peak_rss_mib"] > 10


def test_the_cli_refuses_plain_http_elsewhere_and_a_missing_key_before_any_request(built, tmp_path):
    x = np.zeros((4, 1, 28, 28), np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(4, np.int64))
    base = [NODE, "dist/cli.js", "run", "--data", str(tmp_path / "d.npz"), "--state-dir", str(tmp_path / "s")]
    env = {"PATH": "/usr/bin:/bin"}  # no PF_ENROLLMENT_KEY
    remote = run([*base, "--coordinator", "http://10.255.0.1:8000", "--enrollment-key", "k"], timeout=60, env=env)
    assert remote.returncode == 2 and "in the clear" in remote.stderr, remote.stderr
    keyless = run([*base, "--coordinator", "http://10.255.0.1:8000", "--insecure"], timeout=60, env=env)
    assert keyless.returncode == 2 and "no enrollment key" in keyless.stderr, keyless.stderr
    (tmp_path / "key").write_text("")
    empty = run([*base, "--coordinator", "https://fl.invalid", "--enrollment-key-file", str(tmp_path / "key")], env=env)
    assert empty.returncode == 2 and "the file is empty" in empty.stderr, empty.stderr

"""`pf-train` / `python -m engine` and `pf-eval` as a user runs them: a real process, real files."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import load_default, write_idx
from engine.models import build_model_bytes

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"epochs", "test_accuracy", "final_loss", "seconds"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def test_python_m_engine_one_epoch_on_the_embedded_subset():
    proc = run("-m", "engine", "--epochs", "1", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    summary = last_json_line(proc.stdout)
    assert set(summary) >= SUMMARY_KEYS
    assert summary["epochs"] == 1
    assert 0.6 < summary["test_accuracy"] <= 1.0  # one epoch on 9000 images; chance is 0.1
    assert math.isfinite(summary["final_loss"]) and summary["final_loss"] < math.log(10)
    assert summary["seconds"] > 0
    assert "epoch 1:" in proc.stderr  # the per-epoch line goes to stderr when stdout is JSON


@pytest.fixture(scope="module")
def small_idx_dir(tmp_path_factory) -> Path:
    """A tiny IDX directory (raw for train, .gz for test) cut from the embedded subset."""
    directory = tmp_path_factory.mktemp("idx")
    for split, stem, n in (("train", "train", 640), ("test", "t10k", 200)):
        data = load_default(split, limit=n)
        suffix = "" if split == "train" else ".gz"
        write_idx(directory / f"{stem}-images-idx3-ubyte{suffix}", data.raw)
        write_idx(directory / f"{stem}-labels-idx1-ubyte{suffix}", data.labels.astype(np.uint8))
    return directory


def test_flags_are_honoured_on_a_data_directory(small_idx_dir):
    proc = run(
        "-m",
        "engine",
        "--data",
        str(small_idx_dir),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.02",
        "--seed",
        "3",
        "--json",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    summary = last_json_line(proc.stdout)
    assert summary["epochs"] == 2
    assert proc.stderr.count("(n=200)") == 2  # evaluated on the directory's test split after each epoch
    assert 0.0 <= summary["test_accuracy"] <= 1.0


def test_pf_eval_scores_a_model_file(tmp_path):
    model_path = tmp_path / "lenet.pfm"
    model_path.write_bytes(build_model_bytes("lenet", seed=0))
    proc = run(
        "-c",
        "import sys; from engine.cli import eval_main; sys.exit(eval_main())",
        "--model",
        str(model_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    result = last_json_line(proc.stdout)
    assert result["n"] == load_default("test").size()
    assert 0.0 <= result["accuracy"] <= 0.35  # untrained: about chance


def test_console_scripts_point_at_real_functions():
    import tomllib

    from engine import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pf-train"] == "engine.cli:train_main" and callable(cli.train_main)
    assert scripts["pf-eval"] == "engine.cli:eval_main" and callable(cli.eval_main)


def test_bad_paths_end_in_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run("-m", "engine", "--data", str(missing), "--quiet")
    assert proc.returncode == 2
    assert "pf-train: error:" in proc.stderr and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    corrupt = tmp_path / "corrupt.pfm"
    corrupt.write_bytes(b"not a model file at all")
    proc = run("-c", "import sys; from engine.cli import eval_main; sys.exit(eval_main())", "--model", str(corrupt))
    assert proc.returncode == 2
    assert "pf-eval: error:" in proc.stderr and "magic" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_profile_flag_prints_per_operator_times(small_idx_dir):
    proc = run("-m", "engine", "--data", str(small_idx_dir), "--batch-size", "50", "--quiet", "--profile")
    assert proc.returncode == 0, proc.stderr
    table = proc.stderr
    assert "operator" in table and "ms/step" in table
    for kernel in ("Convolution", "Pooling", "MatrixMul"):
        assert kernel in table
    assert "over" in table.splitlines()[-1]

"""pf-sim's pure parts: device shards, the HTML report, the coordinator options, argument checks."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from coordinator.__main__ import build_parser as coordinator_parser
from simulation.cli import build_parser, config_from_args
from simulation.config import SimConfig
from simulation.processes import CoordinatorProcess
from simulation.report import render
from simulation.shards import device_indices, labels_of, load_split
from simulation.simulation import mean_of


def test_shards_are_disjoint_deterministic_and_capped():
    labels = labels_of(load_split(None, "train"))
    parts = device_indices(labels, 20, "shards:2", seed=3)
    every = np.concatenate(parts)
    assert len(every) == len(labels) == len(np.unique(every))  # each sample exactly once
    assert max(len(np.unique(labels[p])) for p in parts) <= 4  # two label-sorted shards: few labels each
    again = device_indices(labels, 20, "shards:2", seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    capped = device_indices(labels, 20, "shards:2", seed=3, samples_per_device=50)
    assert all(len(c) == 50 and np.isin(c, p).all() for c, p in zip(capped, parts))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, device_indices(labels, 20, "shards:2", seed=4)))
    with pytest.raises(ValueError, match="samples_per_device"):
        device_indices(labels, 20, "iid", seed=0, samples_per_device=0)


def records(n: int) -> list[dict]:
    return [
        {
            "round": i + 1,
            "version": i + 1,
            "accuracy": 0.5 + i / 100,
            "loss": 1.0,
            "devices": 3,
            "failed": 0,
            "samples": 300,
            "train_loss": 0.9,
            "local_global_acc": None if i == 0 else 0.6,
            "personal_acc": 0.7,
            "bytes_up": 1000 * (i + 1),
            "bytes_down": 4000,
            "seconds": 1.5,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 3, 40])
def test_report_is_offline_html_with_three_charts(n):
    recs = records(n)
    summary = {
        "rounds": n,
        "final_accuracy": recs[-1]["accuracy"],
        "initial_accuracy": 0.1,
        "personal_accuracy": 0.7,
        "bytes_up": 10,
        "bytes_down": 20,
        "seconds": 3.0,
        "config": {"partition": "<iid>"},
    }
    page = render(recs, summary)
    assert page.startswith("<!doctype html>") and page.count("<svg") == 3
    assert "<script" not in page and "src=" not in page and "href=" not in page
    assert "&lt;iid&gt;" in page and "<iid>" not in page  # configuration text is escaped
    assert page.count("<tr><td>") == n
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        ET.fromstring(svg)  # well-formed, so browsers draw it


def test_mean_of_weights_by_samples_and_skips_missing():
    answers = [
        {"record": {"personal_acc": 1.0, "samples": 30}},
        {"record": {"personal_acc": 0.0, "samples": 10}},
        {"record": {"personal_acc": None, "samples": 99}},
        {"error": "boom"},
    ]
    assert mean_of(answers, "personal_acc") == pytest.approx(0.75)
    assert mean_of(answers[2:], "personal_acc") is None


def test_coordinator_command_uses_only_real_flags(tmp_path):
    args = build_parser().parse_args(["--strategy", "fedadam", "--encoding", "int8", "--per-round", "3"])
    config = config_from_args(args)
    options = config.coordinator_options(str(tmp_path / "c.db"), "key")
    assert options["server_lr"] == 0.01 and options["goal"] == 3
    argv = CoordinatorProcess(tmp_path, options, port=1234).command()
    parsed = coordinator_parser().parse_args(argv[3:])  # exits on an unknown flag
    assert parsed.strategy == "fedadam" and parsed.encoding == "int8" and parsed.goal == "3"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"per_round": 9}, "--per-round"),
        ({"rounds": 0}, "--rounds"),
        ({"workers": 0}, "--workers"),
        ({"holdout": 1.0}, "--holdout"),
        ({"data": "/nonexistent"}, "--data"),
    ],
)
def test_bad_config_names_the_option(changes, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(devices=8, **changes).check()


def test_privacy_flags_reach_the_coordinator_and_the_report(tmp_path):
    args = build_parser().parse_args(
        [
            "--dp-noise-multiplier",
            "1.1",
            "--dp-clip-norm",
            "0.5",
            "--dp-adaptive-clip",
            "--dp-delta",
            "1e-6",
            "--norm-bound",
            "4",
        ]
    )
    options = config_from_args(args).coordinator_options(str(tmp_path / "c.db"), "key")
    parsed = coordinator_parser().parse_args(CoordinatorProcess(tmp_path, options, port=1234).command()[3:])
    assert (parsed.dp_noise_multiplier, parsed.dp_clip_norm, parsed.dp_delta, parsed.norm_bound) == (
        "1.1",
        "0.5",
        "1e-06",
        "4.0",
    )
    assert parsed.dp_adaptive_clip is not None
    plain = config_from_args(build_parser().parse_args([])).coordinator_options("c.db", "key")
    assert not any(k.startswith("dp_") or k == "norm_bound" for k in plain)  # DP stays off unless asked

    recs = records(3)
    for i, r in enumerate(recs):
        r["epsilon"] = 1.5 * (i + 1)
    summary = {
        "rounds": 3,
        "final_accuracy": 0.5,
        "initial_accuracy": 0.1,
        "personal_accuracy": None,
        "bytes_up": 1,
        "bytes_down": 1,
        "seconds": 1.0,
        "epsilon": 4.5,
        "privacy": {"noise_multiplier": 1.1, "delta": 1e-6, "epsilon_budget": 8.0},
    }
    page = render(recs, summary)
    assert 'id="privacy"' in page and "<b>4.5000</b>" in page and "δ = 1e-06" in page
    assert "<th>epsilon</th>" in page and "<td>3.0000</td>" in page
    assert 'id="privacy"' not in render(records(3), {**summary, "privacy": None})


def test_the_simulation_reads_the_coordinator_only_over_http_and_through_its_audit():
    """No SQL of its own: the driver uses the HTTP API, the chaos audit goes through coordinator.audit."""
    import ast
    from pathlib import Path

    allowed = {"coordinator.audit", "coordinator.settings", "coordinator.strategies"}
    for path in sorted((Path(__file__).resolve().parents[1] / "simulation").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] != "sqlite3", f"{path.name} imports sqlite3"
                if name.split(".")[0] == "coordinator":
                    assert name in allowed, f"{path.name} imports {name}"

"""pf-sim --secure-aggregation end to end (real coordinator process, agent workers, HTTP on loopback): the
same seeded run ends within one accuracy point of the plain run, and with --dropout 0.3 (devices vanish
after their masked input, before unmasking) every round still commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, *flags: str, rounds: int) -> dict:
    args = ["--devices", "8", "--per-round", "5", "--rounds", str(rounds), "--seed", "1", "--json", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.cli", *args, "--workdir", str(tmp_path), *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == rounds + 1
    return lines[-1]


def test_secure_aggregation_matches_the_plain_run(tmp_path):
    # Local training amplifies a 1e-6 difference in the base weights (the quantization) to ~1e-2 in one
    # epoch, so single early rounds differ by a few points either way; the runs end together. Both runs
    # are deterministic (secure aggregation rounds deterministically without DP noise).
    stable = ("--lr", "0.02", "--momentum", "0.5")
    plain = run(tmp_path / "plain", *stable, rounds=5)
    secure = run(tmp_path / "secure", *stable, "--secure-aggregation", rounds=5)
    assert plain["secure_aggregation"] is False and secure["secure_aggregation"] is True
    assert abs(secure["final_accuracy"] - plain["final_accuracy"]) <= 0.01, (plain, secure)


def test_every_round_commits_with_a_third_of_the_devices_dropping_out(tmp_path):
    summary = run(tmp_path, "--secure-aggregation", "--dropout", "0.3", rounds=2)
    assert summary["rounds"] == 2 and summary["secure_aggregation"] is True  # a round that failed would exit 1
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2

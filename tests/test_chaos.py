"""The short chaos run: pf-sim with agents SIGKILLed mid-training and mid-upload, the coordinator
SIGKILLed and restarted on the same database and port, and a fault proxy cutting, delaying and
refusing connections in between. Afterwards nothing acknowledged is lost or double-counted, every
committed version recomputes exactly from the uploads seen on the wire, and training got better."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("chaos") / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulation.cli",
            "--devices",
            "6",
            "--per-round",
            "3",
            "--rounds",
            str(ROUNDS),
            "--seed",
            "1",
            "--epochs",  # long enough that a planned kill moment (0.05-0.4 s into training) comes on a fast machine
            "3",
            "--chaos-agent-kills",
            "2",
            "--chaos-coordinator-restarts",
            "2",
            "--chaos-proxy",
            "--json",
            "--no-progress",
            "--workdir",
            str(work),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return lines[:-1], lines[-1], work


def test_faults_really_happened(chaos_run):
    _, summary, _ = chaos_run
    assert summary["agent_kills"] == 2
    assert summary["agent_kill_phases"] == {"training": 1, "upload": 1}
    assert summary["coordinator_restarts"] == 2
    proxy = summary["proxy"]
    # the proxy's counters hold only faults that happened: a run may cut no request (p = 0.95 per body)
    assert proxy.get("cut_requests", 0) + proxy.get("cut_responses", 0) > 0 and proxy["delayed"] > 0
    assert proxy["uploads_forwarded"] >= summary["acknowledged"]


def test_nothing_lost_nothing_double_counted(chaos_run):
    _, summary, _ = chaos_run
    assert summary["audit_ok"], summary["audit_problems"]
    assert (summary["lost"], summary["double_counted"]) == (0, 0)
    assert summary["acknowledged"] >= ROUNDS * 3
    # the proxy saw a 2xx for (nearly always) every accepted row; each 2xx it saw is a counted row (lost == 0)
    assert 0 < summary["wire_acknowledged"] <= summary["acknowledged"]
    assert summary["in_committed_rounds"] + summary["in_open_round"] == summary["acknowledged"]


def test_every_version_recomputes_exactly_from_the_wire(chaos_run):
    _, summary, _ = chaos_run
    assert summary["versions_recomputed"] == summary["versions_exact"] == ROUNDS  # bit for bit
    assert summary["max_abs_diff"] == 0.0


def test_training_still_improved(chaos_run):
    rounds, summary, _ = chaos_run
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.3, summary["accuracy_by_round"]


def test_the_audit_cli_agrees_on_the_files_left_behind(chaos_run):
    _, summary, work = chaos_run
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.audit",
            "--db",
            str(work / "coordinator.db"),
            "--uploads",
            str(work / "wire"),
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["ok"] and report["acknowledged"] == summary["acknowledged"]

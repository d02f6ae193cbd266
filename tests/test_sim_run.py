"""pf-sim end to end: a real coordinator process, agent worker processes, HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROUND_KEYS = {
    "round",
    "round_id",
    "version",
    "accuracy",
    "loss",
    "devices",
    "failed",
    "samples",
    "train_loss",
    "local_acc_after",
    "local_global_acc",
    "personal_acc",
    "bytes_up",
    "bytes_down",
    "seconds",
}
SUMMARY_KEYS = {
    "rounds",
    "accuracy_by_round",
    "final_accuracy",
    "personal_accuracy",
    "bytes_up",
    "bytes_down",
    "seconds",
}


def pf_sim(*args: str) -> list[str]:
    return [sys.executable, "-m", "simulation.cli", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    report = out / "report.html"
    proc = subprocess.run(
        pf_sim(
            "--devices",
            "6",
            "--per-round",
            "3",
            "--rounds",
            "4",
            "--epochs",
            "1",
            "--partition",
            "dirichlet:1.0",
            "--encoding",
            "int8",
            "--json",
            "--no-progress",
            "--report",
            str(report),
            "--workdir",
            str(out / "work"),
        ),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return lines, report, out / "work"


def test_accuracy_rises_over_rounds(small_run):
    lines, _, _ = small_run
    accuracy = lines[-1]["accuracy_by_round"]
    assert len(accuracy) == 4
    assert accuracy[-1] >= accuracy[0] + 0.1, accuracy  # after the last round vs after the first
    assert accuracy[-1] > lines[-1]["initial_accuracy"] + 0.3


def test_json_lines_have_the_documented_keys(small_run):
    lines, _, _ = small_run
    rounds, summary = lines[:-1], lines[-1]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert set(r) >= ROUND_KEYS, ROUND_KEYS - set(r)
        assert r["devices"] == 3 and r["failed"] == 0
        assert r["bytes_up"] > 0
        # int8 updates are ~4x smaller than float32 models; a round may download nothing when the release
        # gate held its version back (every device already holds the released base)
        assert r["bytes_up"] < r["bytes_down"] or (r["bytes_down"] == 0 and r["personalized"] == 0)
        assert 0 <= r["personal_acc"] <= 1
    assert set(summary) >= SUMMARY_KEYS, SUMMARY_KEYS - set(summary)
    assert summary["rounds"] == 4
    assert summary["accuracy_by_round"] == [r["accuracy"] for r in rounds]
    assert summary["final_accuracy"] == rounds[-1]["accuracy"]
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rounds) < summary["bytes_down"]
    assert summary["coordinator_peak_rss_mib"] > 10


def test_devices_keep_their_own_state_and_token(small_run):
    _, _, work = small_run
    states = sorted((work / "devices").iterdir())
    assert 3 <= len(states) <= 6
    tokens = {json.loads((s / "identity.json").read_text())["token"] for s in states}
    assert len(tokens) == len(states)  # one enrollment per device, reused across rounds


def test_report_holds_the_three_svg_charts(small_run):
    _, report, _ = small_run
    page = report.read_text()
    for chart in ("accuracy-chart", "personal-chart", "bytes-chart"):
        assert f'<svg id="{chart}"' in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count("<polyline") >= 4 and "<rect" in page


def test_bad_arguments_are_named():
    proc = subprocess.run(
        pf_sim("--devices", "3", "--per-round", "5"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--per-round" in proc.stderr
    proc = subprocess.run(
        pf_sim("--partition", "zipf:2"), cwd=REPO, env=env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "zipf" in proc.stderr


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find child processes")
def test_ctrl_c_stops_the_coordinator_and_the_workers(tmp_path):
    proc = subprocess.Popen(
        pf_sim(
            "--devices",
            "4",
            "--per-round",
            "2",
            "--rounds",
            "50",
            "--json",
            "--no-progress",
            "--workdir",
            str(tmp_path),
        ),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert json.loads(proc.stdout.readline())["round"] == 1  # running: coordinator and workers are up
        children = children_of(proc.pid)
        assert len(children) == 3  # the coordinator and two workers
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "interrupted" in err
        time.sleep(0.2)
        assert [c for c in children if Path(f"/proc/{c}").exists()] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

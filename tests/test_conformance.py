"""The conformance suite: the Python agent passes every scenario; each deliberately broken agent is
caught by the scenario for the rule it breaks (and the suite's report says why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.conformance import SCENARIOS, run_suite
from protocol.conformance.suite import agent_command

REPO = Path(__file__).resolve().parents[1]
AGENT_ARGS = (
    "run --coordinator {url} --enrollment-key {key} --state-dir {state} --data {data} "
    "--once --ignore-conditions --holdout 0"
)
PF_AGENT = f"{sys.executable} -m device_agent {AGENT_ARGS}"


def test_the_python_agent_passes_every_scenario(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "protocol.conformance", "--agent", "pf-agent", "--agent-cmd", PF_AGENT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == [], proc.stdout[-4000:]
    assert summary == {"agent": "pf-agent", "passed": [c.name for c in SCENARIOS], "failed": [], "scenarios": 9}
    assert proc.returncode == 0


BROKEN = [
    ("full_weights", "deltas_only", "full weights, not a delta"),
    ("retry_4xx", "no_retry_on_4xx", "was sent"),
    ("ignore_retry_after", "retry_after", "the agent came back after"),
    ("forget_rounds", "one_upload_per_task", "again after a restart"),
    ("new_key_on_retry", "idempotent_retry", "changed the Idempotency-Key"),
    ("late_upload", "deadline", "after the deadline"),
    ("accept_corrupted", "corrupted_model", "for a task on a corrupted model"),
]


@pytest.mark.parametrize(("broken", "scenario", "reason"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_agent_is_caught_by_the_right_scenario(tmp_path, broken, scenario, reason):
    command = f"{sys.executable} {REPO / 'tests' / 'broken_agent.py'} --break {broken} {AGENT_ARGS}"
    lines: list[str] = []
    summary = run_suite(command, agent=broken, only=[scenario], workdir=tmp_path, out=lines.append)
    report = "\n".join(lines)
    assert summary["failed"] == [scenario], report
    assert reason in report, report
    assert json.loads(lines[-1]) == summary


def test_agent_command_fills_placeholders_inside_words():
    values = {"url": "http://127.0.0.1:9", "key": "k y", "state": "/tmp/s d", "data": "/d.npz"}
    words = agent_command("node cli.js run --coordinator={url} --key {key} --state '{state}' {data}", values)
    assert words[:4] == ["node", "cli.js", "run", "--coordinator=http://127.0.0.1:9"]
    assert words[4:] == ["--key", "k y", "--state", "/tmp/s d", "/d.npz"]


def test_the_command_line_lists_scenarios_and_refuses_a_template_without_placeholders():
    listed = subprocess.run(
        [sys.executable, "-m", "protocol.conformance", "--list"], cwd=REPO, capture_output=True, text=True
    )
    assert [line.split()[0] for line in listed.stdout.splitlines()] == [c.name for c in SCENARIOS]
    bad = subprocess.run(
        [sys.executable, "-m", "protocol.conformance", "--agent-cmd", "pf-agent run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "placeholders" in bad.stderr

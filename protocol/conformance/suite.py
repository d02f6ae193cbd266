"""Run an agent command against every scenario and report: a line per scenario, the problems found,
the tail of the agent's log for a failure, and a last JSON line for machines."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from protocol.conformance.scenario import ENROLLMENT_KEY, Scenario
from protocol.conformance.scenarios import SCENARIOS
from protocol.conformance.server import ScriptedServer
from protocol.conformance.world import MODEL_VERSION, World

PLACEHOLDERS = ("{url}", "{key}", "{state}", "{data}")


@dataclass
class Result:
    name: str
    checks: str
    problems: list[str]
    seconds: float
    exit_codes: list[int | None] = field(default_factory=list)  # None: still running when stopped
    log_tail: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems


def agent_command(template: str, values: dict[str, str]) -> list[str]:
    """Split the command as a shell would, then fill the placeholders in each word (no quoting needed)."""
    words = shlex.split(template)
    if not words:
        raise ValueError("--agent-cmd is empty")
    filled = []
    for word in words:
        for placeholder in PLACEHOLDERS:
            word = word.replace(placeholder, values[placeholder.strip("{}")])
        filled.append(word)
    return filled


def stop(proc: subprocess.Popen) -> int | None:
    """Stop an agent that is still running (SIGTERM, then SIGKILL); its exit code if it had ended by itself."""
    code = proc.poll()
    if code is not None:
        return code
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return None


def play(scenario: Scenario, template: str, url: str, world: World, workdir: Path) -> Result:
    started = time.monotonic()
    state = workdir / scenario.name / "state"
    state.mkdir(parents=True, exist_ok=True)
    log_path = workdir / scenario.name / "agent.log"
    values = {"url": url, "key": ENROLLMENT_KEY, "state": str(state), "data": str(world.data_path)}
    exit_codes: list[int | None] = []
    with open(log_path, "wb") as log:
        for run in range(scenario.runs):
            scenario.start_run(run)
            log.write(f"---- run {run + 1} of {scenario.runs}\n".encode())
            log.flush()
            proc = subprocess.Popen(agent_command(template, values), stdout=log, stderr=subprocess.STDOUT)
            until = time.monotonic() + scenario.timeout
            while proc.poll() is None and time.monotonic() < until:
                with scenario.lock:
                    if scenario.finished():
                        break
                time.sleep(0.05)
            exit_codes.append(stop(proc))
    with scenario.lock:
        try:
            problems = scenario.verdict()
        except Exception as exc:  # a verdict that cannot even be computed is a failure, not a crash
            problems = [f"checking the agent's requests failed: {type(exc).__name__}: {exc}"]
    tail = ""
    if problems:
        lines = log_path.read_text(errors="replace").splitlines()
        tail = "\n".join(lines[-12:])
    return Result(scenario.name, scenario.checks, problems, time.monotonic() - started, exit_codes, tail)


def select(only: Sequence[str] | None) -> list[type[Scenario]]:
    if not only:
        return list(SCENARIOS)
    known = {cls.name: cls for cls in SCENARIOS}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {sorted(known)}")
    return [known[name] for name in only]


def run_suite(
    template: str,
    *,
    agent: str | None = None,
    only: Sequence[str] | None = None,
    workdir: str | os.PathLike | None = None,
    out: Callable[[str], None] = print,
) -> dict:
    """Play the scenarios against the agent; print the report through `out`; return the summary."""
    chosen = select(only)
    missing = [p for p in ("{url}", "{state}", "{data}") if p not in template]
    if missing:
        raise ValueError(f"--agent-cmd must contain the placeholders {missing} (and usually {{key}})")
    with tempfile.TemporaryDirectory(prefix="pf-conformance-") as tmp:
        root = Path(workdir) if workdir else Path(tmp)
        world = World(root / "world")
        results = []
        with ScriptedServer() as server:
            out(f"pocketfed protocol v1 conformance: {agent or template}")
            out(
                f"scripted coordinator {server.url}; model lenet v{MODEL_VERSION} "
                f"({len(world.model_bytes)} bytes); {world.samples} Fashion-MNIST examples in {world.data_path.name}"
            )
            for cls in chosen:
                scenario = cls(world)
                server.handler = scenario
                result = play(scenario, template, server.url, world, root)
                results.append(result)
                out(f"{'PASS' if result.passed else 'FAIL'}  {result.name:<22} {result.seconds:5.1f}s  {result.checks}")
                for problem in result.problems:
                    out(f"      - {problem}")
                if result.log_tail:
                    out("      agent log (last lines):")
                    out("\n".join("        " + line for line in result.log_tail.splitlines()))
    passed = [r.name for r in results if r.passed]
    failed = [r.name for r in results if not r.passed]
    out(f"{len(results)} scenarios: {len(passed)} passed, {len(failed)} failed")
    summary = {"agent": agent or template, "passed": passed, "failed": failed, "scenarios": len(results)}
    out(json.dumps(summary))
    return summary

"""One federated round of each device agent over real HTTP: peak RSS, wall time and bytes sent of the
Python agent (pf-agent) and the TypeScript agent (node device_agent/js/dist/cli.js, onnxruntime-node)
doing the same task on the same 600 Fashion-MNIST samples against the conformance suite's scripted
coordinator (enroll, check in, download model [and training step], train, encode, upload).

Peak RSS is the agent process's own (os.wait4), so the coordinator is not counted. The Python agent
also fine-tunes its personal head after the upload (its normal round); the TypeScript agent has none.

    python bench/agent_protocol_round.py [--samples 600] [--epochs 1] [--encoding int8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protocol.conformance.scenario import ENROLLMENT_KEY  # noqa: E402
from protocol.conformance.scenarios import DeltasOnly  # noqa: E402
from protocol.conformance.server import ScriptedServer  # noqa: E402
from protocol.conformance.suite import agent_command  # noqa: E402
from protocol.conformance.world import World  # noqa: E402

AGENT_ARGS = "run --coordinator {url} --enrollment-key {key} --state-dir {state} --data {data} --once"
AGENTS = {
    "python": f"{sys.executable} -m device_agent {AGENT_ARGS} --ignore-conditions --holdout 0",
    "js": f"node {REPO / 'device_agent' / 'js' / 'dist' / 'cli.js'} {AGENT_ARGS}",
}


def one_round(name: str, template: str, world: World, server: ScriptedServer, args: argparse.Namespace) -> dict:
    scenario = DeltasOnly(world)
    scenario.epochs, scenario.encoding = args.epochs, args.encoding
    server.handler = scenario
    scenario.start_run(0)
    state = Path(tempfile.mkdtemp(prefix=f"pf-bench-{name}-"))
    values = {"url": server.url, "key": ENROLLMENT_KEY, "state": str(state), "data": str(world.data_path)}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    proc = subprocess.Popen(agent_command(template, values), cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # the agent's own peak RSS (Linux: KiB)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(state, ignore_errors=True)
    accepted = [u for u in scenario.uploads if u.accepted]
    problems = scenario.verdict()
    return {
        "agent": name,
        "exit_code": proc.returncode,
        "conforms": not problems,
        "problems": problems,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "wall_seconds": round(wall, 2),
        "bytes_sent": len(accepted[0].seen.body) if accepted else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--encoding", default="int8", choices=("float32", "float16", "int8"))
    parser.add_argument("--agents", default="python,js")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, ScriptedServer() as server:
        world = World(Path(tmp), samples=args.samples)
        for name in args.agents.split(","):
            if name == "js" and world.training_step is None:
                results.append({"agent": name, "skipped": "no training step: the onnx package is not installed"})
                continue
            results.append(one_round(name, AGENTS[name], world, server, args))
    summary = {"bench": "agent_protocol_round", "samples": args.samples, "epochs": args.epochs}
    summary |= {"encoding": args.encoding, "agents": results}
    if not args.json:
        for result in results:
            print(result)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

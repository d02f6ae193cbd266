"""Devices played by the TypeScript agent (device_agent/js) in a mixed fleet: `pf-sim --js-agents N`.

Devices 0..N-1 are TypeScript devices: for each task the worker runs one `node dist/cli.js run
--once` process against the same coordinator, with the device's own state directory (token, cached
model and training step, pending upload) and its shard written as raw uint8 pixels; the agent
applies the model's recorded preprocessing itself and trains with the served ONNX training step in
onnxruntime-node. Python and TypeScript devices federate one model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

import device_agent
from engine.data import NONE, IDataView

JS_DIR = Path(device_agent.__file__).resolve().parent / "js"
CLI = JS_DIR / "dist" / "cli.js"
DOWNLOADED = re.compile(r"downloaded the (?:model|step) of version \d+ \((\d+) bytes\)")


class JsAgentError(RuntimeError):
    """The TypeScript agent cannot run here, or one of its runs failed."""


def prepare() -> str:
    """The node executable, with the agent built (tsc) when its sources are newer than the build."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        raise JsAgentError("--js-agents needs Node.js (>= 20) and npm on PATH")
    if not (JS_DIR / "node_modules" / "onnxruntime-node").is_dir():
        raise JsAgentError(
            f"--js-agents: the TypeScript agent is not installed; run: cd {JS_DIR} && npm ci --ignore-scripts"
        )
    sources = [*JS_DIR.glob("src/**/*.ts"), JS_DIR / "cli.ts"]
    if not CLI.exists() or max(p.stat().st_mtime for p in sources) > CLI.stat().st_mtime:
        built = subprocess.run([npm, "run", "build"], cwd=JS_DIR, capture_output=True, text=True, timeout=600)
        if built.returncode != 0:
            raise JsAgentError(f"--js-agents: building the TypeScript agent failed:\n{built.stdout[-2000:]}")
    return node


def write_shard(dataset: IDataView, indices: np.ndarray, path: Path) -> None:
    """The device's samples as a phone holds them: raw uint8 pixels (or [0, 1] floats for datasets
    without raw pixels), the model's preprocessing left to the agent."""
    raw = getattr(dataset, "raw", None)
    labels = np.asarray(dataset.get_batch(indices)[1], np.int64)
    if raw is not None and raw.dtype == np.uint8:
        x = raw[indices][:, None] if raw.ndim == 3 else raw[indices]
    else:
        x = NONE.view(dataset).get_batch(indices)[0]
    np.savez(path, x=x, y=labels)


def play_js_device(
    node: str, device: int, state_dir: Path, shard: Path, coordinator: str, enrollment_key: str, seed: int,
    timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """One federated task of a TypeScript device: its record (what the agent emitted once its update was
    accepted) and the bytes it downloaded."""
    state_dir.mkdir(parents=True, exist_ok=True)
    command = [
        node, str(CLI), "run", "--coordinator", coordinator, "--enrollment-key", enrollment_key,
        "--state-dir", str(state_dir), "--data", str(shard), "--once", "--json", "--name", f"sim-js-{device}",
        "--seed", str(seed), "--max-wait", "2",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise JsAgentError(f"TypeScript device {device}: no accepted update within {timeout:.0f}s") from e
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise JsAgentError(f"TypeScript device {device} exited with {done.returncode}: {done.stderr[-1500:]}")
    return {
        "device": device,
        "agent": "js",
        "record": json.loads(lines[-1]),
        "bytes_down": sum(int(n) for n in DOWNLOADED.findall(done.stderr)),
    }

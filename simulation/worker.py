"""A worker process that plays many simulated devices, one at a time, each a real `Agent`.

    python -m simulation.worker '<json WorkerConfig>'

Protocol (JSON lines): the orchestrator writes {"device": i} to stdin; the worker runs device i
for one federated task (enroll if new, check in, download, train, upload, personalize) and
writes {"device": i, "record": {...}, "bytes_down": n} or {"device": i, "error": "..."} to stdout.
An empty line, {"stop": true} or EOF ends it. Logs go to stderr, stdout carries only answers.

Each device keeps its own state directory (token, cached model, personal layers), so a
device that takes part again behaves exactly like a phone would: same identity, cached
model by ETag, personal head carried over. Only the httpx connection pool is shared.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from device_agent.client import CoordinatorClient, RetryPolicy
from device_agent.eligibility import AlwaysEligible
from device_agent.runner import Agent, AgentConfig
from device_agent.state import AgentState
from protocol.messages import CheckinAnswer
from simulation.js_agents import play_js_device, write_shard
from simulation.shards import device_dataset, device_indices, labels_of, load_split

log = logging.getLogger("pocketfed.sim.worker")


@dataclass
class WorkerConfig:
    coordinator: str
    enrollment_key: str
    state_root: str
    devices: int
    partition: str = "iid"
    seed: int = 0
    data: str | None = None
    samples_per_device: int | None = None
    holdout: float = 0.2
    max_wait: float = 120.0  # a device that gets no task for this long gives up on the round
    mark_tasks: bool = False  # touch <device state>/task-started when a check-in returns a task (chaos.py)
    js_agents: int = 0  # devices 0..js_agents-1 run the TypeScript agent (js_agents.py)
    node: str | None = None  # the node executable for them

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class GaveUp(RuntimeError):
    """A device waited too long for a task (the round was full or closed)."""


class CountingClient(CoordinatorClient):
    """The agent's client, counting model bytes downloaded (the simulation's bytes_down)."""

    bytes_down = 0
    task_marker: Path | None = None

    def checkin(self, num_samples: int | None) -> CheckinAnswer:
        answer = super().checkin(num_samples)
        if self.task_marker is not None and answer.task is not None:
            self.task_marker.touch()  # training starts now: the chaos driver may kill us from here on
        return answer

    def download_model(self, version: int, etag: str | None = None) -> tuple[bytes | None, str | None]:
        data, new_etag = super().download_model(version, etag)
        self.bytes_down += len(data or b"")
        return data, new_etag


class DevicePlayer:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.train = load_split(config.data, "train")
        self.parts = device_indices(
            labels_of(self.train), config.devices, config.partition, config.seed, config.samples_per_device
        )
        self.client = CountingClient(config.coordinator, timeout=60.0, retry=RetryPolicy(attempts=4))
        self.threads: list[threading.Thread] = []

    def hand_off(self, run: Callable[[], Any]) -> None:
        """Secure aggregation: the device's phases run in a thread while this worker plays the next device
        (the cohort's devices must be online together; a worker plays its devices one at a time)."""
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def play(self, device: int, leave_after: str | None = None) -> dict[str, Any]:
        """One federated task for `device`; returns the agent's record plus what it downloaded."""
        if device < self.config.js_agents:
            return self.play_js(device)
        waited = [0.0]

        def sleep(seconds: float) -> None:
            waited[0] += seconds
            if waited[0] > self.config.max_wait:
                raise GaveUp(f"device {device}: no task after waiting {waited[0]:.0f}s")
            time.sleep(seconds)

        cfg = self.config
        agent_config = AgentConfig(
            coordinator=cfg.coordinator,
            enrollment_key=cfg.enrollment_key,
            name=f"sim-{device}",
            once=True,
            holdout=cfg.holdout,
            seed=cfg.seed * 100_003 + device,
            max_wait=1.0,
            secagg_leave_after=leave_after,
        )
        state = AgentState(Path(cfg.state_root) / f"device-{device:05d}")
        self.client.task_marker = state.dir / "task-started" if cfg.mark_tasks else None
        dataset = device_dataset(self.train, self.parts, device)
        agent = Agent(
            agent_config,
            self.client,
            state,
            dataset,
            AlwaysEligible(),
            sleep=sleep,
            emit=lambda line: None,
            secagg_hand_off=self.hand_off,
        )
        before = self.client.bytes_down
        started = time.perf_counter()
        records = agent.run()
        return {
            "device": device,
            "agent": "python",
            "record": records[-1],
            "bytes_down": self.client.bytes_down - before,
            "seconds": time.perf_counter() - started,
        }

    def play_js(self, device: int) -> dict[str, Any]:
        """The same task played by the TypeScript agent in a node process (its own state directory)."""
        cfg = self.config
        shard = Path(cfg.state_root).parent / "js-shards" / f"device-{device:05d}.npz"
        if not shard.exists():
            shard.parent.mkdir(parents=True, exist_ok=True)
            write_shard(self.train, self.parts[device], shard)
        started = time.perf_counter()
        answer = play_js_device(
            cfg.node or "node",
            device,
            Path(cfg.state_root) / f"device-{device:05d}",
            shard,
            cfg.coordinator,
            cfg.enrollment_key,
            seed=cfg.seed * 100_003 + device,
            timeout=cfg.max_wait + 600.0,
        )
        return {**answer, "seconds": time.perf_counter() - started}


def serve(config: WorkerConfig, stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> None:
    player = DevicePlayer(config)
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    for line in stdin:
        if not line.strip():
            break
        job = json.loads(line)
        if job.get("stop"):
            break
        device = int(job["device"])
        try:
            answer = player.play(device, job.get("leave_after"))
        except Exception as exc:  # one broken device must not take the other devices of this worker down
            log.warning("device %d failed: %s: %s", device, type(exc).__name__, exc)
            answer = {"device": device, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=stdout, flush=True)
    for thread in player.threads:  # secure-aggregation phases still running
        thread.join(timeout=60)
    player.client.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m simulation.worker '<json config>'")
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s worker %(name)s %(levelname)s %(message)s",
    )
    serve(WorkerConfig(**json.loads(argv[0])))


if __name__ == "__main__":
    main()

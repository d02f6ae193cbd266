"""A worker process that plays many simulated devices, one at a time, each a real `Agent`.

    python -m simulation.worker '<json WorkerConfig>'

Protocol (JSON lines): the orchestrator writes {"device": i} to stdin; the worker runs device i
for one federated training task (enroll if new, check in, download, train, upload, personalize;
an evaluate or personalize task offered on the way is done too) and writes
{"device": i, "record": {...}, "bytes_down": n, "personal_version": v} or {"device": i, "error": "..."}
to stdout. Other jobs: {"device": i, "mode": "sweep"} checks in once and does the evaluate or
personalize task it is offered, if any ("record" is then null when there was none);
{"device": i, "mode": "measure", "version": v} touches nothing and measures the device's personal
model (what `pf-agent predict` serves) and version v on its held-out data. {"dropout": true}
makes the device vanish mid-training (fleet.py).
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
from device_agent.eligibility import Probe, Verdict
from device_agent.runner import Agent, AgentConfig
from device_agent.state import AgentState
from protocol.messages import CheckinAnswer
from simulation.fleet import speed_factors
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
    speed_spread: float = 0.0  # device i trains exp(speed_spread * z_i) times slower (fleet.py)
    js_agents: int = 0  # devices 0..js_agents-1 run the TypeScript agent (js_agents.py)
    node: str | None = None  # the node executable for them

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class GaveUp(RuntimeError):
    """A device waited too long for a task (the round was full or closed)."""


class Idle(Exception):
    """A sweep's device was offered nothing (it has reported on the current version already)."""


class DroppedOut(RuntimeError):
    """The simulated device vanished mid-training (its app was killed)."""


class SimulatedConditions(Probe):
    """Eligible always, but slow (each training step followed by a sleep making it `factor` times as
    long) and, with `drop_at`, gone at that check (the first is before check-in, then one per step)."""

    def __init__(self, factor: float = 1.0, drop_at: int | None = None):
        self.factor, self.drop_at = factor, drop_at
        self.checks, self.last = 0, None

    def check(self) -> Verdict:
        self.checks += 1
        if self.drop_at is not None and self.checks >= self.drop_at:
            raise DroppedOut(f"dropped out after {self.checks - 1} training steps")
        if self.last is not None and self.factor > 1:
            time.sleep((time.monotonic() - self.last) * (self.factor - 1))
        self.last = time.monotonic()
        return Verdict(True, "simulated device")


class CountingClient(CoordinatorClient):
    """The agent's client, counting model bytes downloaded (the simulation's bytes_down)."""

    bytes_down = 0
    task_marker: Path | None = None

    def checkin(self, num_samples: int | None, task_kinds: list[str] | None = None) -> CheckinAnswer:
        answer = super().checkin(num_samples, task_kinds)
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
        self.speed = speed_factors(config.devices, config.speed_spread, config.seed)
        self.models: dict[int, bytes] = {}  # versions measured against, by number
        self.version: int | None = None  # the version a "measure" job compares with
        self.admin_token: str | None = None  # and the token it downloads it with

        self.threads: list[threading.Thread] = []

    def hand_off(self, run: Callable[[], Any]) -> None:
        """Secure aggregation: the device's phases run in a thread while this worker plays the next device
        (the cohort's devices must be online together; a worker plays its devices one at a time)."""
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def play(
        self, device: int, mode: str = "train", dropout: bool = False, leave_after: str | None = None
    ) -> dict[str, Any]:
        """One federated task for `device`; returns the agent's record plus what it downloaded."""
        js = device < self.config.js_agents
        if js and mode == "sweep":  # the TypeScript agent keeps no personal model: nothing to offer it
            return {"device": device, "agent": "js", "record": None, "personal_version": None}
        if js and mode == "train":
            return self.play_js(device)
        waited = [0.0]

        def sleep(seconds: float) -> None:
            if mode == "sweep":
                raise Idle()
            waited[0] += seconds
            if waited[0] > self.config.max_wait:
                raise GaveUp(f"device {device}: no task after waiting {waited[0]:.0f}s")
            time.sleep(seconds)

        cfg = self.config
        agent_config = AgentConfig(
            coordinator=cfg.coordinator,
            enrollment_key=cfg.enrollment_key,
            name=f"sim-{device}",
            once=mode != "train",
            rounds=1,  # a training task; an evaluate or personalize task offered first is done on the way
            holdout=cfg.holdout,
            seed=cfg.seed * 100_003 + device,
            max_wait=1.0,
            secagg_leave_after=leave_after,
        )
        state = AgentState(Path(cfg.state_root) / f"device-{device:05d}")
        self.client.task_marker = state.dir / "task-started" if cfg.mark_tasks else None
        dataset = device_dataset(self.train, self.parts, device)
        conditions = SimulatedConditions(float(self.speed[device]), drop_at=3 if dropout else None)
        agent = Agent(
            agent_config,
            self.client,
            state,
            dataset,
            conditions,
            sleep=sleep,
            emit=lambda line: None,
            secagg_hand_off=self.hand_off,
        )
        if mode == "measure":
            return self.measure(device, agent, personal=not js)
        before = self.client.bytes_down
        started = time.perf_counter()
        try:
            records = agent.run()
        except Idle:
            records = [None]
        return {
            "device": device,
            "agent": "python",
            "record": records[-1],
            "side_tasks": sum(1 for r in records if r is not None and r.get("kind") not in (None, "train")),
            "bytes_down": self.client.bytes_down - before,
            "seconds": time.perf_counter() - started,
            "personal_version": agent.personal.base_version(),
        }

    def measure(self, device: int, agent: Agent, personal: bool = True) -> dict[str, Any]:
        """The device's personal model (as `pf-agent predict` serves it) and the global version of the job,
        both on the device's held-out data; reads the device's state, changes nothing (the model is
        downloaded with the job's admin token: a device that was never online holds no token)."""
        from device_agent.models import model_view
        from device_agent.personal import load_personal_model
        from engine import load_model_bytes
        from engine.trainer import Trainer

        version = self.version
        if version not in self.models:
            self.client.token = self.admin_token
            self.models[version], _ = self.client.download_model(version)
        has_personal = personal and agent.state.cached_model() is not None
        out: dict[str, Any] = {
            "device": device,
            "personal_version": agent.personal.base_version() if personal else None,
        }
        for name, model in (
            ("global_acc", load_model_bytes(self.models[version])),
            ("personal_acc", load_personal_model(agent.state) if has_personal else None),
        ):
            if model is None:
                out[name] = None
                continue
            trainer = Trainer(model)
            out[name] = float(trainer.evaluate(model_view(model, agent.eval_set))["accuracy"])
            trainer.release()
        if out["personal_acc"] is None:  # never downloaded a model: it serves nothing personal
            out["personal_acc"] = out["global_acc"]
        return out

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
        player.version, player.admin_token = job.get("version"), job.get("token")
        try:
            mode, dropout = job.get("mode", "train"), bool(job.get("dropout"))
            answer = player.play(device, mode, dropout, job.get("leave_after"))
        except DroppedOut as exc:
            answer = {"device": device, "error": f"DroppedOut: {exc}", "dropped": True}
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

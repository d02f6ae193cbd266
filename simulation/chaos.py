"""Chaos for the fleet simulation: train through crashes and a hostile network, then audit.

    coordinator (SIGKILLed + restarted on the same DB and port)
        ^
        |  FaultProxy: refuses, delays, cuts requests/responses mid-body; records uploads
        v
    worker pool (devices SIGKILLed mid-training or mid-upload, then resumed)

Each fault is a hook on the one `Simulation` (hooks.py); `chaos_hooks` builds them from a seeded
plan, so the rounds choose the same devices as a run without chaos:
- `FaultyNetwork`: the fault proxy between agents and coordinator, and its record of the uploads;
- `CoordinatorRestarts`: SIGKILL when the proxy has seen a planned number of upload
  acknowledgements (so the kill lands while devices are mid-round), then start it again;
- `AgentKills`: kill a device in "training" (no update persisted yet) or "upload" (persisted,
  unacknowledged);
- `Audit`: at the end, `coordinator.audit` checks the books against the proxy's record.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from coordinator.audit import audit
from coordinator.settings import new_secret
from engine.serialize.container import loads
from simulation.config import SimConfig
from simulation.coordinator_api import CoordinatorAPI
from simulation.faultproxy import FaultProxy, Faults
from simulation.hooks import SimulationHook
from simulation.simulation import Simulation


@dataclass
class ChaosConfig:
    agent_kills: int = 2
    coordinator_restarts: int = 2
    proxy_faults: bool = True  # False: the proxy only relays and records
    refuse: float = 0.15  # per connection (httpx keeps connections alive: these are few)
    delay: float = 0.15  # per message
    max_delay: float = 0.3
    cut_request: float = 0.05
    cut_response: float = 0.05
    cut_ack: float = 0.25

    def check(self) -> None:
        if self.agent_kills < 0 or self.coordinator_restarts < 0:
            raise ValueError("--chaos-agent-kills and --chaos-coordinator-restarts must be >= 0")

    def faults(self, seed: int) -> Faults:
        if not self.proxy_faults:
            return Faults(seed=seed)
        return Faults(
            seed=seed,
            refuse=self.refuse,
            delay=self.delay,
            max_delay=self.max_delay,
            cut_request=self.cut_request,
            cut_response=self.cut_response,
            cut_ack=self.cut_ack,
        )


FAULT_KINDS = ("refused", "delayed", "cut_requests", "cut_responses")  # the proxy's counters of what it did
KillPlan = list[tuple[int, str, float]]  # (round, phase, seconds into training), in order


def fault_plan(config: SimConfig, chaos: ChaosConfig) -> tuple[list[int], KillPlan]:
    """When to restart the coordinator (after so many acknowledged uploads) and when to kill agents.

    Its own random stream, apart from the device choice. Restarts: distinct counts below the run's
    total. Kills: alternating phases, before the last round (a kill whose moment does not come in its
    round waits for the next device that offers it)."""
    plan = np.random.default_rng([config.seed, 1])
    span = max(config.rounds * config.per_round - 1, 1)
    picks = plan.choice(np.arange(1, span + 1), size=min(chaos.coordinator_restarts, span), replace=False)
    restart_at = sorted(int(a) for a in picks) + [span] * max(0, chaos.coordinator_restarts - span)
    kills = sorted(
        (int(plan.integers(1, max(config.rounds, 2))), ("training", "upload")[i % 2], float(plan.uniform(0.05, 0.4)))
        for i in range(chaos.agent_kills)
    )
    return restart_at, kills


class FaultyNetwork(SimulationHook):
    """Agents reach the coordinator only through the fault proxy, which also witnesses every upload."""

    def __init__(self, faults: Faults):
        self.faults = faults
        self.proxy: FaultProxy | None = None

    def start(self, sim: Simulation) -> None:
        self.record_dir = sim.workdir / "wire"
        self.proxy = FaultProxy(sim.coordinator.port, self.faults, record_dir=self.record_dir).start()

    def agent_url(self, url: str) -> str:
        return self.proxy.url

    def worker_options(self) -> dict[str, Any]:
        return {"max_wait": 30.0}  # a device stuck behind the faults gives up, the round goes on

    def acknowledged_uploads(self) -> int:
        return self.proxy.counters["uploads_acknowledged"] if self.proxy is not None else 0

    def summarize(self, summary: dict) -> None:
        counters = {**dict.fromkeys(FAULT_KINDS, 0), **self.proxy.counters}  # a fault that never fired reads 0
        summary["proxy"] = dict(sorted(counters.items()))

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()


class CoordinatorRestarts(SimulationHook):
    """SIGKILLs the coordinator once the proxy has seen a planned number of upload acknowledgements (so
    the crash lands mid-round), then restarts it on the same database and port."""

    def __init__(self, restart_at: list[int], acknowledged_uploads: Callable[[], int]):
        self.restart_at, self.acknowledged_uploads = list(restart_at), acknowledged_uploads
        self.seconds: list[float] = []

    def start(self, sim: Simulation) -> None:
        self.coordinator = sim.coordinator

    def tick(self) -> None:
        if self.restart_at and self.acknowledged_uploads() >= self.restart_at[0]:
            self.restart_at.pop(0)
            started = time.perf_counter()
            self.coordinator.crash_and_restart()
            self.seconds.append(time.perf_counter() - started)

    def add_to_record(self, record: dict, detail: dict) -> None:
        record["coordinator_restarts"] = len(self.seconds)

    def summarize(self, summary: dict) -> None:
        summary["coordinator_restarts"] = len(self.seconds)
        summary["restart_seconds"] = [round(s, 2) for s in self.seconds]


class AgentKills(SimulationHook):
    """SIGKILLs the worker playing a device at a planned moment of its task; the pool replays the device."""

    def __init__(self, plan: KillPlan):
        self.plan = list(plan)
        self.phases: Counter[str] = Counter()
        self.progress_at_start: dict[int, str | None] = {}  # device -> its progress.json when its task began

    def start(self, sim: Simulation) -> None:
        self.sim = sim

    def worker_options(self) -> dict[str, Any]:
        return {"mark_tasks": True}  # <state>/task-started: when training begins

    def task_started(self, device: int) -> None:
        self.progress_at_start[device] = self.progress(device)
        (self.sim.state_dir(device) / "task-started").unlink(missing_ok=True)

    def tick(self) -> None:
        if not self.plan or self.plan[0][0] > self.sim.round_number:
            return
        _, phase, after = self.plan[0]
        pool = self.sim.pool
        for index, (device, _) in list(pool.busy.items()):
            pending = (self.sim.state_dir(device) / "pending.json").exists()
            if (phase == "upload" and pending) or (phase == "training" and self.training_for(device) >= after):
                pool.kill(index)
                self.plan.pop(0)
                self.phases[phase] += 1
                return

    def progress(self, device: int) -> str | None:
        try:
            return (self.sim.state_dir(device) / "progress.json").read_text()
        except FileNotFoundError:
            return None

    def training_for(self, device: int) -> float:
        """Seconds since this task's check-in gave the device a task, while no update is persisted yet
        and the device has not finished (it personalizes after its upload); -1 otherwise."""
        state = self.sim.state_dir(device)
        try:
            started = (state / "task-started").stat().st_mtime
        except FileNotFoundError:
            return -1.0
        if (state / "pending.json").exists() or self.progress(device) != self.progress_at_start.get(device):
            return -1.0
        return time.time() - started

    def add_to_record(self, record: dict, detail: dict) -> None:
        record["agent_kills"] = self.sim.pool.kills

    def summarize(self, summary: dict) -> None:
        summary["agent_kills"] = self.sim.pool.kills
        summary["agent_kill_phases"] = dict(self.phases)


class Audit(SimulationHook):
    """The independent check at the end: `coordinator.audit` over the database and the wire record."""

    def __init__(self, chaos: ChaosConfig, network: FaultyNetwork):
        self.chaos, self.network = chaos, network
        self.admin_token = new_secret(16)  # to download the final model for its digest

    def coordinator_options(self) -> dict[str, Any]:
        return {"admin_token": self.admin_token}

    def start(self, sim: Simulation) -> None:
        self.sim = sim

    def add_to_record(self, record: dict, detail: dict) -> None:
        record["received"] = detail["received"]

    def summarize(self, summary: dict) -> None:
        records = self.sim.records
        summary["final_weights_sha256"] = self.tensors_sha256(records[-1]["version"])
        summary["device_failures"] = sum(r["failed"] for r in records)
        summary["config"]["chaos"] = asdict(self.chaos)

    def tensors_sha256(self, version: int) -> str:
        """A digest of a version's tensors alone (names, dtypes, shapes, bytes): equal weights, equal digest."""
        coordinator = self.sim.coordinator
        api = CoordinatorAPI(coordinator.url, lambda: coordinator.running, coordinator.log_tail, self.admin_token)
        try:
            data = api.model_file(version)
        finally:
            api.close()
        digest = hashlib.sha256()
        for name, tensor in sorted(loads(data, kind="model").tensors.items()):
            digest.update(f"{name}:{tensor.dtype}:{tensor.shape};".encode())
            digest.update(np.ascontiguousarray(tensor).tobytes())
        return digest.hexdigest()

    def after_stop(self, summary: dict) -> None:
        report = audit(self.sim.db_path, uploads=self.network.record_dir)
        summary.update(
            acknowledged=report.acknowledged,
            lost=report.lost,
            double_counted=report.double_counted,
            wire_acknowledged=report.wire_acknowledged,
            ack_replays=report.ack_replays,
            undelivered_acks=report.undelivered_acks,
            in_committed_rounds=report.in_committed_rounds,
            in_open_round=report.in_open_round,
            versions_checked=report.versions_checked,
            versions_recomputed=report.versions_recomputed,
            versions_exact=report.versions_exact,
            max_abs_diff=report.max_abs_diff,
            audit_ok=report.ok,
            audit_problems=report.problems[:10],
        )


def chaos_hooks(config: SimConfig, chaos: ChaosConfig) -> list[SimulationHook]:
    """Every chaos hook, even those with nothing planned (a calm baseline still records and audits)."""
    config.check()  # the plan is drawn from it
    chaos.check()
    restart_at, kills = fault_plan(config, chaos)
    network = FaultyNetwork(chaos.faults(config.seed))
    return [  # between device answers, a due restart goes before a due kill
        network,
        CoordinatorRestarts(restart_at, network.acknowledged_uploads),
        AgentKills(kills),
        Audit(chaos, network),
    ]

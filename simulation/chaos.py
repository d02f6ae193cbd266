"""Chaos mode of the fleet simulation: train through crashes and a hostile network, then audit.

    coordinator (SIGKILLed + restarted on the same DB and port)
        ^
        |  FaultProxy: refuses, delays, cuts requests/responses mid-body; records uploads
        v
    KillablePool workers (devices SIGKILLed mid-training or mid-upload, then resumed)

Rounds run as in `Simulation` (seeded choice of K devices, replacements if some fail), but the
driver reads round status from the database (the coordinator may be down when it looks), and
between device answers it injects faults on a seeded plan:
- agent kills: in "training" (no update persisted yet) or "upload" (persisted, unacknowledged);
- coordinator restarts: SIGKILL when the proxy has seen a planned number of upload
  acknowledgements (so the kill lands while devices are mid-round), then start it again.
At the end, `coordinator.audit` checks the books against the proxy's record of the uploads.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from coordinator.audit import audit
from coordinator.store import ModelFiles
from engine.serialize.container import loads
from simulation.faultproxy import FaultProxy, Faults
from simulation.killable import KillablePool
from simulation.processes import CoordinatorProcess, SimulationError
from simulation.simulation import SimConfig
from simulation.worker import WorkerConfig


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


class ChaosSimulation:
    def __init__(self, config: SimConfig, chaos: ChaosConfig, emit: Callable[[dict], None] | None = None):
        config.check()
        if chaos.agent_kills < 0 or chaos.coordinator_restarts < 0:
            raise ValueError("--chaos-agent-kills and --chaos-coordinator-restarts must be >= 0")
        self.config, self.chaos = config, chaos
        self.emit = emit or (lambda record: None)
        self.rng = np.random.default_rng(config.seed)  # device choice: the same as a run without chaos
        plan = np.random.default_rng([config.seed, 1])  # the fault plan has its own stream
        self.records: list[dict] = []
        self.kill_phases: Counter[str] = Counter()
        self.restart_seconds: list[float] = []
        self.round_number = 0
        self.progress_at_start: dict[int, str | None] = {}  # device -> its progress.json when its task began
        # coordinator restarts: after these numbers of acknowledged uploads (all below the run's total)
        span = max(config.rounds * config.per_round - 1, 1)
        picks = plan.choice(np.arange(1, span + 1), size=min(chaos.coordinator_restarts, span), replace=False)
        self.restart_at = sorted(int(a) for a in picks) + [span] * max(0, chaos.coordinator_restarts - span)
        # agent kills: (round, phase, seconds into training), alternating phases, before the last round
        # (a kill whose moment does not come in its round waits for the next device that offers it)
        self.kill_plan = sorted(
            (
                int(plan.integers(1, max(config.rounds, 2))),
                ("training", "upload")[i % 2],
                float(plan.uniform(0.05, 0.4)),
            )
            for i in range(chaos.agent_kills)
        )

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="pf-chaos-") as tmp:
            self.workdir = Path(cfg.workdir or tmp).resolve()  # children run in other folders
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.db_path = Path(cfg.db).resolve() if cfg.db else self.workdir / "coordinator.db"
            key = secrets.token_urlsafe(16)
            self.coordinator = CoordinatorProcess(self.workdir, cfg.coordinator_options(str(self.db_path), key))
            self.proxy = FaultProxy(
                self.coordinator.port, self.chaos.faults(cfg.seed), record_dir=self.workdir / "wire"
            )
            self.pool: KillablePool | None = None
            started = time.perf_counter()
            try:
                self.coordinator.start()
                self.proxy.start()
                worker = WorkerConfig(
                    coordinator=self.proxy.url,
                    enrollment_key=key,
                    state_root=str(self.workdir / "devices"),
                    devices=cfg.devices,
                    partition=cfg.partition,
                    seed=cfg.seed,
                    data=cfg.data,
                    samples_per_device=cfg.samples_per_device,
                    holdout=cfg.holdout,
                    max_wait=30.0,
                    mark_tasks=True,
                )  # a stuck device gives up, the round goes on
                self.pool = KillablePool(cfg.workers, worker.to_json(), self.workdir)
                self.pool.on_start = self.note_progress
                initial = self.wait_accuracy(0)
                for number in range(1, cfg.rounds + 1):
                    self.round_number = number
                    record = self.one_round(number)
                    self.records.append(record)
                    self.emit(record)
            finally:
                if self.pool is not None:
                    self.pool.stop()
                self.coordinator.stop()
                self.proxy.stop()
            report = audit(self.db_path, uploads=self.workdir / "wire")
            self.weights_digest = self.tensors_sha256(self.records[-1]["version"])
            return self.summary(initial, report, time.perf_counter() - started)

    def tensors_sha256(self, version: int) -> str:
        """A digest of a version's tensors alone (names, dtypes, shapes, bytes): equal weights, equal digest."""
        data = (self.db_path.with_suffix(".models") / ModelFiles.filename(version)).read_bytes()
        digest = hashlib.sha256()
        for name, tensor in sorted(loads(data, kind="model").tensors.items()):
            digest.update(f"{name}:{tensor.dtype}:{tensor.shape};".encode())
            digest.update(np.ascontiguousarray(tensor).tobytes())
        return digest.hexdigest()

    def summary(self, initial: dict, report, seconds: float) -> dict:
        accuracy = [r["accuracy"] for r in self.records]
        return {
            "agent_kills": self.pool.kills,
            "agent_kill_phases": dict(self.kill_phases),
            "coordinator_restarts": len(self.restart_seconds),
            "acknowledged": report.acknowledged,
            "lost": report.lost,
            "double_counted": report.double_counted,
            "final_accuracy": accuracy[-1],
            "initial_accuracy": initial["accuracy"],
            "accuracy_by_round": accuracy,
            "rounds": len(self.records),
            "wire_acknowledged": report.wire_acknowledged,
            "ack_replays": report.ack_replays,
            "undelivered_acks": report.undelivered_acks,
            "in_committed_rounds": report.in_committed_rounds,
            "in_open_round": report.in_open_round,
            "versions_checked": report.versions_checked,
            "versions_recomputed": report.versions_recomputed,
            "versions_exact": report.versions_exact,
            "max_abs_diff": report.max_abs_diff,
            "final_weights_sha256": self.weights_digest,
            "audit_ok": report.ok,
            "audit_problems": report.problems[:10],
            "proxy": dict(sorted(self.proxy.counters.items())),
            "restart_seconds": [round(s, 2) for s in self.restart_seconds],
            "device_failures": sum(r["failed"] for r in self.records),
            "seconds": round(seconds, 2),
            "config": {
                **{
                    k: v
                    for k, v in asdict(self.config).items()
                    if k not in ("workdir", "db", "progress", "extra_options")
                },
                "chaos": asdict(self.chaos),
            },
        }

    # ------------------------------------------------------------------ one round

    def one_round(self, number: int) -> dict:
        cfg = self.config
        started = time.perf_counter()
        round_id = self.open_round_id()
        chosen = [int(d) for d in self.rng.choice(cfg.devices, size=cfg.per_round, replace=False)]
        answers = self.pool.play(chosen, tick=self.inject)
        spare = [d for d in self.rng.permutation(cfg.devices).tolist() if d not in chosen]
        r = self.round_row(round_id)
        while r["status"] == "open" and r["received"] < r["goal"] and spare:
            missing = r["goal"] - r["received"]
            replacements, spare = spare[:missing], spare[missing:]
            answers += self.pool.play(replacements, tick=self.inject)
            r = self.round_row(round_id)
        deadline = time.monotonic() + cfg.round_timeout + 30
        while r["status"] == "open" and time.monotonic() < deadline:
            self.inject()
            time.sleep(0.1)
            r = self.round_row(round_id)
        if r["status"] != "committed":
            errors = "; ".join(a["error"] for a in answers if "error" in a)[:1500]
            raise SimulationError(
                f"round {round_id} ended {r['status']}: {r['reason']}; device errors: {errors or 'none'}"
            )
        evaluation = self.wait_accuracy(int(r["result_version"]))
        ok = [a for a in answers if "record" in a]
        return {
            "round": number,
            "round_id": round_id,
            "version": int(r["result_version"]),
            "accuracy": evaluation["accuracy"],
            "loss": evaluation["loss"],
            "devices": len(ok),
            "failed": len(answers) - len(ok),
            "received": r["received"],
            "agent_kills": self.pool.kills,
            "coordinator_restarts": len(self.restart_seconds),
            "seconds": round(time.perf_counter() - started, 3),
        }

    # ------------------------------------------------------------------ faults

    def inject(self) -> None:
        """Called between device answers: kill an agent or the coordinator when the plan says so."""
        if self.restart_at and self.proxy.counters["uploads_acknowledged"] >= self.restart_at[0]:
            self.restart_at.pop(0)
            self.restart_coordinator()
        if not self.kill_plan or self.kill_plan[0][0] > self.round_number:
            return
        _, phase, after = self.kill_plan[0]
        for index, (device, _) in list(self.pool.busy.items()):
            pending = (self.state_dir(device) / "pending.json").exists()
            if (phase == "upload" and pending) or (phase == "training" and self.training_for(device) >= after):
                self.pool.kill(index)
                self.kill_plan.pop(0)
                self.kill_phases[phase] += 1
                return

    def state_dir(self, device: int) -> Path:
        return self.workdir / "devices" / f"device-{device:05d}"

    def progress(self, device: int) -> str | None:
        try:
            return (self.state_dir(device) / "progress.json").read_text()
        except FileNotFoundError:
            return None

    def note_progress(self, device: int) -> None:
        self.progress_at_start[device] = self.progress(device)
        (self.state_dir(device) / "task-started").unlink(missing_ok=True)

    def training_for(self, device: int) -> float:
        """Seconds since this task's check-in gave the device a task, while no update is persisted yet
        and the device has not finished (it personalizes after its upload); -1 otherwise."""
        state = self.state_dir(device)
        try:
            started = (state / "task-started").stat().st_mtime
        except FileNotFoundError:
            return -1.0
        if (state / "pending.json").exists() or self.progress(device) != self.progress_at_start.get(device):
            return -1.0
        return time.time() - started

    def restart_coordinator(self) -> None:
        """SIGKILL, then the same command on the same database and port."""
        started = time.perf_counter()
        proc = self.coordinator.proc
        proc.kill()
        proc.wait()
        self.coordinator.stop()  # closes its log handle; the process is already gone
        self.coordinator.start()
        self.restart_seconds.append(time.perf_counter() - started)

    # ------------------------------------------------------------------ reading the database

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql, params).fetchall()

    def open_round_id(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self._query("SELECT id FROM rounds WHERE status='open' ORDER BY id DESC LIMIT 1")
            if rows:
                return int(rows[0]["id"])
            time.sleep(0.1)
        raise SimulationError(f"the coordinator opened no round within {timeout:.0f}s")

    def round_row(self, round_id: int) -> dict:
        return dict(
            self._query(
                "SELECT id, status, received, goal, reason, result_version FROM rounds WHERE id=?", (round_id,)
            )[0]
        )

    def wait_accuracy(self, version: int, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self._query("SELECT accuracy, eval_loss FROM model_versions WHERE version=?", (version,))
            if rows and rows[0]["accuracy"] is not None:
                return {"accuracy": float(rows[0]["accuracy"]), "loss": float(rows[0]["eval_loss"])}
            time.sleep(0.1)
        raise SimulationError(f"model v{version} was not evaluated within {timeout:.0f}s")

"""The round loop of a simulated fleet: sample K of N devices, let the worker pool play them
against the real coordinator over HTTP, read back what the round produced.

    coordinator process  <--HTTP-->  worker processes (each plays many devices, one Agent at a time)
          ^                                  ^
          |  /v1/rounds/{id}, SQLite (ro)    |  {"device": i} / records, over pipes
          +-------------- Simulation (this module, inside pf-sim) ------+

Device selection is done here, client-side and seeded (like Flower's simulation), so runs are
repeatable: the coordinator assigns whoever checks in, and only the chosen devices check in.
Global accuracy is the coordinator's own server-side evaluation (--eval-data) of each model
version, read from its database read-only (there is no HTTP endpoint listing it yet).
"""

from __future__ import annotations

import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from engine.progress import ProgressBar
from simulation.pool import WorkerPool
from simulation.processes import CoordinatorProcess, SimulationError
from simulation.shards import resolve_data
from simulation.worker import WorkerConfig


@dataclass
class SimConfig:
    devices: int = 8
    per_round: int = 4
    rounds: int = 6
    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    partition: str = "iid"
    strategy: str = "fedavg"
    encoding: str = "float32"
    seed: int = 0
    data: str | None = None  # None: the embedded Fashion-MNIST subset
    workers: int = 2
    holdout: float = 0.2
    samples_per_device: int | None = None
    server_lr: float | None = None  # None: the coordinator's default (fedadam: 0.01)
    fedprox_mu: float | None = None
    model: str = "lenet"
    round_timeout: float = 600.0
    workdir: str | None = None  # None: a temporary directory, removed afterwards
    db: str | None = None
    progress: bool = True
    extra_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {self.devices}")
        if not 1 <= self.per_round <= self.devices:
            raise ValueError(f"--per-round must be in 1..{self.devices} (--devices), got {self.per_round}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {self.rounds}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"--holdout must be in [0, 1), got {self.holdout}")
        if not resolve_data(self.data).is_dir():
            raise ValueError(f"--data {self.data}: not a directory (expected an IDX dataset with a test split)")

    def coordinator_options(self, db: str, enrollment_key: str) -> dict[str, Any]:
        server_lr = self.server_lr
        if server_lr is None and self.strategy == "fedadam":
            server_lr = 0.01  # Reddi et al.'s range; the coordinator's default 1.0 is meant for FedAvg
        return {
            "db": db,
            "model": self.model,
            "model_seed": self.seed,
            "eval_data": str(resolve_data(self.data)),
            "goal": self.per_round,
            "over_select": 2.0,
            "min_fraction": 1.0,
            "deadline": self.round_timeout,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "momentum": self.momentum,
            "strategy": self.strategy,
            "encoding": self.encoding,
            "server_lr": server_lr,
            "fedprox_mu": self.fedprox_mu,
            "enrollment_key": enrollment_key,
            "min_retry_after": 0,
            "max_retry_after": 2,
            "tick_interval": 0.5,
            "log_level": "warning",
            **self.extra_options,
        }


def mean_of(answers: list[dict], key: str) -> float | None:
    """Sample-weighted mean of a record field over the devices that reported it."""
    pairs = [
        (a["record"][key], a["record"].get("samples", 1)) for a in answers if a.get("record", {}).get(key) is not None
    ]
    if not pairs:
        return None
    values, weights = np.array(pairs, dtype=np.float64).T
    return float(np.average(values, weights=weights))


class Simulation:
    """Start the processes, run the rounds, stop everything (also on errors and Ctrl-C)."""

    def __init__(self, config: SimConfig, emit: Callable[[dict], None] | None = None):
        config.check()
        self.config = config
        self.emit = emit or (lambda record: None)
        self.rng = np.random.default_rng(config.seed)
        self.records: list[dict] = []

    def run(self) -> dict:
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="pf-sim-") as tmp:
            workdir = Path(cfg.workdir or tmp).resolve()  # children run in other folders
            workdir.mkdir(parents=True, exist_ok=True)
            self.db_path = Path(cfg.db).resolve() if cfg.db else workdir / "coordinator.db"
            key = secrets.token_urlsafe(16)
            self.coordinator = CoordinatorProcess(workdir, cfg.coordinator_options(str(self.db_path), key))
            self.pool: WorkerPool | None = None
            started = time.perf_counter()
            try:
                self.coordinator.start()
                worker = WorkerConfig(
                    coordinator=self.coordinator.url,
                    enrollment_key=key,
                    state_root=str(workdir / "devices"),
                    devices=cfg.devices,
                    partition=cfg.partition,
                    seed=cfg.seed,
                    data=cfg.data,
                    samples_per_device=cfg.samples_per_device,
                    holdout=cfg.holdout,
                )
                self.pool = WorkerPool(cfg.workers, worker.to_json(), workdir)
                self.http = httpx.Client(base_url=self.coordinator.url, timeout=30)
                initial = self.wait_accuracy(0)
                for number in range(1, cfg.rounds + 1):
                    record = self.one_round(number)
                    self.records.append(record)
                    self.emit(record)
                return self.summary(initial, time.perf_counter() - started)
            finally:
                if self.pool is not None:
                    self.pool.stop()
                self.coordinator.stop()

    # ------------------------------------------------------------------ one round

    def open_round_id(self) -> int:
        for _ in range(100):
            round_id = self.http.get("/healthz").json()["round_id"]
            if round_id is not None:
                return int(round_id)
            time.sleep(0.1)
        raise SimulationError("the coordinator has no open round (is it paused?)")

    def one_round(self, number: int) -> dict:
        cfg = self.config
        started = time.perf_counter()
        round_id = self.open_round_id()
        chosen = [int(d) for d in self.rng.choice(cfg.devices, size=cfg.per_round, replace=False)]
        bar = ProgressBar(cfg.per_round, f"round {number}/{cfg.rounds}", enabled=cfg.progress)

        def progress(answer: dict) -> None:
            bar.update(1, "failed" if "error" in answer else f"acc {answer['record'].get('acc_after', 0):.3f}")

        answers = self.pool.play(chosen, progress)
        detail = self.round_detail(round_id)
        spare = [d for d in self.rng.permutation(cfg.devices).tolist() if d not in chosen]
        while detail["status"] == "open" and detail["received"] < detail["goal"] and spare:
            # some devices failed: send replacements, as over-selection would (room: over_select=2)
            missing = detail["goal"] - detail["received"]
            bar.total += missing
            replacements, spare = spare[:missing], spare[missing:]
            answers += self.pool.play(replacements, progress)
            detail = self.round_detail(round_id)
        bar.close()
        deadline = time.monotonic() + cfg.round_timeout + 5
        while detail["status"] == "open" and time.monotonic() < deadline:
            time.sleep(0.5)
            detail = self.round_detail(round_id)
        if detail["status"] != "committed":
            errors = "; ".join(a["error"] for a in answers if "error" in a)[:1500]
            raise SimulationError(
                f"round {round_id} was {detail['status']}: {detail.get('reason')}; device errors: {errors or 'none'}"
            )
        version = int(detail["result_version"])
        evaluation = self.wait_accuracy(version)
        ok = [a for a in answers if "record" in a]
        return {
            "round": number,
            "round_id": round_id,
            "version": version,
            "accuracy": evaluation["accuracy"],
            "loss": evaluation["loss"],
            "devices": len(ok),
            "failed": len(answers) - len(ok),
            "samples": int(sum(a["record"]["samples"] for a in ok)),
            "train_loss": mean_of(ok, "loss_after"),
            "local_acc_after": mean_of(ok, "acc_after"),
            "local_global_acc": mean_of(ok, "global_acc"),
            "personal_acc": mean_of(ok, "personal_acc"),
            "bytes_up": int(sum(a["record"]["bytes_sent"] for a in ok)),
            "bytes_down": int(sum(a.get("bytes_down", 0) for a in ok)),
            "epsilon": detail.get("epsilon"),  # privacy spent so far (None: DP off)
            "seconds": round(time.perf_counter() - started, 3),
        }

    def privacy_settings(self) -> dict | None:
        options = self.config.extra_options
        if not options.get("dp_noise_multiplier"):
            return None
        return {
            "noise_multiplier": options["dp_noise_multiplier"],
            "delta": options.get("dp_delta", 1e-5),
            "epsilon_budget": options.get("dp_epsilon_budget"),
        }

    def round_detail(self, round_id: int) -> dict:
        response = self.http.get(f"/v1/rounds/{round_id}")
        if response.status_code != 200:
            raise SimulationError(f"GET /v1/rounds/{round_id}: {response.status_code} {response.text[:300]}")
        return response.json()

    def wait_accuracy(self, version: int, timeout: float = 300.0) -> dict:
        """The coordinator's server-side evaluation of `version` (it runs off the request path)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as conn:
                row = conn.execute(
                    "SELECT accuracy, eval_loss FROM model_versions WHERE version=?", (version,)
                ).fetchone()
            if row is not None and row[0] is not None:
                return {"accuracy": float(row[0]), "loss": float(row[1])}
            if self.coordinator.proc.poll() is not None:
                raise SimulationError("the coordinator exited while evaluating")
            time.sleep(0.1)
        raise SimulationError(f"model v{version} was not evaluated within {timeout:.0f}s")

    # ------------------------------------------------------------------ the whole run

    def summary(self, initial: dict, seconds: float) -> dict:
        last = self.records[-1]
        return {
            "rounds": len(self.records),
            "accuracy_by_round": [r["accuracy"] for r in self.records],
            "final_accuracy": last["accuracy"],
            "personal_accuracy": last["personal_acc"],
            "initial_accuracy": initial["accuracy"],
            "bytes_up": sum(r["bytes_up"] for r in self.records),
            "bytes_down": sum(r["bytes_down"] for r in self.records),
            "epsilon": last.get("epsilon"),
            "privacy": self.privacy_settings(),
            "seconds": round(seconds, 2),
            "seconds_per_round": round(float(np.mean([r["seconds"] for r in self.records])), 3),
            "coordinator_peak_rss_mib": self.coordinator.peak_rss_mib(),
            "worker_peak_rss_mib": max((m for m in self.pool.peak_rss_mib() if m is not None), default=None),
            "config": {
                k: v for k, v in asdict(self.config).items() if k not in ("workdir", "db", "progress", "extra_options")
            },
        }

"""The round loop of a simulated fleet: sample K of N devices, let the worker pool play them against
the real coordinator over HTTP, read back what the round produced.

    coordinator process  <--HTTP-->  worker processes (each plays many devices, one Agent at a time)
          ^                                  ^
          |  GET /healthz, /v1/rounds/{id},  |  {"device": i} / records, over pipes
          |      /v1/models                  |
          +------------ Simulation (this module, inside pf-sim) ---------+

Device selection is done here, client-side and seeded, so runs are repeatable: the coordinator
assigns whoever checks in, and only the chosen devices check in. Global accuracy is the
coordinator's own server-side evaluation (--eval-data) of each model version. Chaos (agent kills,
coordinator restarts, a fault proxy, the audit) plugs in as hooks (hooks.py, chaos.py).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from coordinator.settings import new_secret
from engine.progress import ProgressBar
from simulation.config import SimConfig
from simulation.coordinator_api import CoordinatorAPI
from simulation.fleet import Availability, fleet_mean, personalized_count
from simulation.hooks import SimulationHook
from simulation.js_agents import JsAgentError, prepare
from simulation.pool import WorkerPool
from simulation.processes import CoordinatorProcess, SimulationError
from simulation.worker import WorkerConfig

COMMIT_GRACE = 30.0  # seconds past the coordinator's round deadline before the driver gives up on a round


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

    def __init__(
        self,
        config: SimConfig,
        emit: Callable[[dict], None] | None = None,
        hooks: Sequence[SimulationHook] = (),
    ):
        config.check()
        self.config = config
        try:
            self.node = prepare() if config.js_agents else None
        except JsAgentError as e:
            raise ValueError(str(e)) from e
        self.emit = emit or (lambda record: None)
        self.hooks = list(hooks)
        self.rng = np.random.default_rng(config.seed)
        self.records: list[dict] = []
        self.round_number = 0
        self.pool: WorkerPool | None = None
        self.availability = Availability(config.availability, config.devices, config.seed)
        self.hour = 0.0  # the fleet's simulated UTC clock, in hours (a day is compressed into the run)
        self.drop_rng = np.random.default_rng([config.seed, 5])  # its own stream: selection stays as it was
        self.personal_versions: dict[int, int | None] = {}  # device -> base version of its personal layers

    def run(self) -> dict:
        cfg = self.config
        with tempfile.TemporaryDirectory(prefix="pf-sim-") as tmp:
            self.workdir = Path(cfg.workdir or tmp).resolve()  # children run in other folders
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.db_path = Path(cfg.db).resolve() if cfg.db else self.workdir / "coordinator.db"
            key = new_secret(16)
            options = cfg.coordinator_options(str(self.db_path), key)
            options["admin_token"] = new_secret(16)  # to pause rounds while the fleet personalizes
            for hook in self.hooks:
                options.update(hook.coordinator_options())
            self.admin_token = options["admin_token"]
            self.coordinator = CoordinatorProcess(self.workdir, options)
            self.api = CoordinatorAPI(
                self.coordinator.url,
                lambda: self.coordinator.running,
                self.coordinator.log_tail,
                options["admin_token"],
            )
            started = time.perf_counter()
            try:
                self.coordinator.start()
                self.pool = self.start_workers(key)
                initial = self.api.evaluation(0)
                for number in range(1, cfg.rounds + 1):
                    self.round_number = number
                    record = self.one_round(number)
                    self.records.append(record)
                    self.emit(record)
                fleet = self.measure_fleet()
                summary = self.summary(initial, time.perf_counter() - started)
                summary.update(fleet)
                for hook in self.hooks:
                    hook.summarize(summary)
            finally:
                self.stop()
            for hook in self.hooks:
                hook.after_stop(summary)
            return summary

    def start_workers(self, enrollment_key: str) -> WorkerPool:
        for hook in self.hooks:
            hook.start(self)
        url = self.coordinator.url
        options: dict = {}
        for hook in self.hooks:
            url = hook.agent_url(url)
            options.update(hook.worker_options())
        cfg = self.config
        worker = WorkerConfig(
            coordinator=url,
            enrollment_key=enrollment_key,
            state_root=str(self.workdir / "devices"),
            devices=cfg.devices,
            partition=cfg.partition,
            seed=cfg.seed,
            data=cfg.data,
            samples_per_device=cfg.samples_per_device,
            holdout=cfg.holdout,
            speed_spread=cfg.speed_spread,
            js_agents=cfg.js_agents,
            node=self.node,
            **options,
        )
        return WorkerPool(cfg.workers, worker.to_json(), self.workdir)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        self.coordinator.stop()
        self.api.close()
        for hook in self.hooks:
            hook.stop()

    def state_dir(self, device: int) -> Path:
        """A device's state directory (token, cached model, pending upload, progress)."""
        return self.workdir / "devices" / f"device-{device:05d}"

    # ------------------------------------------------------------------ one round

    def tick(self) -> None:
        for hook in self.hooks:
            hook.tick()

    def task_started(self, device: int) -> None:
        for hook in self.hooks:
            hook.task_started(device)

    def train_job(self, device: int) -> dict:
        """Without secure aggregation, --dropout makes a chosen device vanish mid-training (fleet.py)."""
        cfg = self.config
        if cfg.secure_aggregation or not cfg.dropout:
            return {}
        return {"dropout": True} if self.drop_rng.random() < cfg.dropout else {}

    def play(self, devices: list[int], on_answer: Callable[[dict], None], extra: dict | None = None) -> list[dict]:
        hooks = {"on_start": self.task_started, "tick": self.tick} if self.hooks else {}  # else the pool may block
        answers = self.pool.play(devices, on_answer, extra=extra, job=self.train_job, **hooks)
        self.note_personal(answers)
        return answers

    def note_personal(self, answers: list[dict]) -> None:
        for a in answers:
            if "personal_version" in a:
                self.personal_versions[int(a["device"])] = a["personal_version"]

    def online_now(self) -> list[int]:
        """The devices online at the fleet's clock, moved on (in whole rounds' worth of hours) until at
        least a round's worth of them is."""
        cfg = self.config
        for _ in range(int(24 / cfg.hours_per_round) + 1):
            online = self.availability.online(self.hour)
            if len(online) >= cfg.per_round:
                return online
            self.hour += cfg.hours_per_round
        raise SimulationError(f"--availability {cfg.availability}: never {cfg.per_round} devices online at once")

    def one_round(self, number: int) -> dict:
        cfg = self.config
        started = time.perf_counter()
        round_id = self.api.open_round_id()
        online = self.online_now()
        picked = self.rng.choice(len(online), size=cfg.per_round, replace=False)
        chosen = [online[int(i)] for i in picked]
        bar = ProgressBar(cfg.per_round, f"round {number}/{cfg.rounds}", enabled=cfg.progress)

        def progress(answer: dict) -> None:
            bar.update(1, "failed" if "error" in answer else f"acc {answer['record'].get('acc_after', 0):.3f}")

        leaving = chosen[: math.floor(cfg.dropout * len(chosen) + 1e-9)] if cfg.secure_aggregation else []
        answers = self.play(chosen, progress, {d: {"leave_after": "masked_input"} for d in leaving})
        detail = self.api.round_detail(round_id)
        spare = [online[i] for i in self.rng.permutation(len(online)).tolist() if online[i] not in chosen]
        if cfg.secure_aggregation:  # its devices count only once the sum is unmasked: no replacements
            spare = []
        while detail["status"] == "open" and detail["received"] < detail["goal"] and spare:
            # some devices failed: send replacements, as over-selection would (room: over_select=2)
            missing = detail["goal"] - detail["received"]
            bar.total += missing
            replacements, spare = spare[:missing], spare[missing:]
            answers += self.play(replacements, progress)
            detail = self.api.round_detail(round_id)
        bar.close()
        deadline = time.monotonic() + cfg.round_timeout + COMMIT_GRACE
        while detail["status"] == "open" and time.monotonic() < deadline:
            self.tick()
            time.sleep(0.1)
            detail = self.api.round_detail(round_id)
        if detail["status"] != "committed":
            errors = "; ".join(a["error"] for a in answers if "error" in a)[:1500]
            raise SimulationError(
                f"round {round_id} ended {detail['status']}: {detail.get('reason')}; device errors: {errors or 'none'}"
            )
        record = self.round_record(number, answers, detail, started)
        record["hour"], record["online"] = round(self.hour % 24.0, 2), len(online)
        record["dropped"] = sum(1 for a in answers if a.get("dropped"))
        record["personalized"], swept = self.personalize(online)
        record["bytes_down_personalize"] = swept  # models fetched to personalize: part of the round's bytes_down
        record["bytes_down"] += swept
        self.hour += cfg.hours_per_round
        return record

    def personalize(self, online: list[int]) -> tuple[int, int]:
        """The online devices check in while no round is open: each is offered a personalize task for the
        version just committed (the coordinator's choice, as for a real fleet). Returns how many did one,
        and the model bytes they downloaded."""
        self.api.set_paused(True)
        try:
            answers = self.pool.play(online, job=lambda device: {"mode": "sweep"})
        finally:
            self.api.set_paused(False)
        self.note_personal(answers)
        done = sum(1 for a in answers if a.get("record") is not None)
        return done, int(sum(a.get("bytes_down", 0) for a in answers))

    def measure_fleet(self) -> dict:
        """Every device, online or not, on its own held-out data: the personal model it serves and the
        released version (the base devices should be on; a candidate held back by the gate is not)."""
        released = int(self.api.get_json("/v1/models/latest")["version"])
        answers = self.pool.play(
            list(range(self.config.devices)),
            job=lambda device: {"mode": "measure", "version": released, "token": self.admin_token},
        )
        failed = [a["error"] for a in answers if "error" in a]
        if failed:
            raise SimulationError(f"measuring the fleet failed on {len(failed)} devices: {failed[0]}")
        self.note_personal(answers)
        return {
            "personalized_devices": personalized_count(self.personal_versions, released),
            "personal_accuracy_fleet": fleet_mean([a["personal_acc"] for a in answers]),
            "global_accuracy_fleet": fleet_mean([a["global_acc"] for a in answers]),
            "released_version": released,
        }

    def round_record(self, number: int, answers: list[dict], detail: dict, started: float) -> dict:
        version = int(detail["result_version"])
        evaluation = self.api.evaluation(version)
        ok = [a for a in answers if "record" in a]
        record = {
            "round": number,
            "round_id": detail["id"],
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
            "accepted_by_agent": {kind: sum(a.get("agent") == kind for a in ok) for kind in ("python", "js")},
        }
        for hook in self.hooks:
            hook.add_to_record(record, detail)
        record["seconds"] = round(time.perf_counter() - started, 3)  # from the round's start to its evaluation
        return record

    # ------------------------------------------------------------------ the whole run

    def privacy_settings(self) -> dict | None:
        options = self.config.extra_options
        if not options.get("dp_noise_multiplier"):
            return None
        return {
            "noise_multiplier": options["dp_noise_multiplier"],
            "delta": options.get("dp_delta", 1e-5),
            "epsilon_budget": options.get("dp_epsilon_budget"),
            "sampling": "unamplified (q = 1: pf-sim picks each round's devices itself)",
        }

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
            "accepted_by_agent": {
                kind: sum(r["accepted_by_agent"][kind] for r in self.records) for kind in ("python", "js")
            },
            "privacy": self.privacy_settings(),
            "secure_aggregation": self.config.secure_aggregation,
            "seconds": round(seconds, 2),
            "seconds_per_round": round(float(np.mean([r["seconds"] for r in self.records])), 3),
            "coordinator_peak_rss_mib": self.coordinator.peak_rss_mib(),
            "worker_peak_rss_mib": max((m for m in self.pool.peak_rss_mib() if m is not None), default=None),
            "config": self.config.describe(),
        }

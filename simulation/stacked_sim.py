"""`pf-sim --stacked`: the fast, in-process round loop, for benchmarks and long experiments.

The default `pf-sim` plays every device as a real agent over HTTP against a coordinator process
(realism: the wire, the database, retries). This mode keeps the math and drops the plumbing, as
Flower's simulation does: the same devices (partition, hold-out split, seeds), the same local SGD
with the same data order, the same update wire format (each delta is encoded with
protocol/update.py, optionally top-k with error feedback, and decoded before it counts), the
coordinator's own strategy classes; but

- worker processes train their share of a round's devices as one stacked graph (stacked.py),
  compiled once per process, with the data preprocessed once per process;
- the driver aggregates in-process, no coordinator, no database, no agent bookkeeping
  (no per-device before/after evaluation, no personal layers);
- the global test evaluation runs in a background thread, off the round's critical path: a
  round's `seconds` end when its new model exists, its accuracy is filled in when ready.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np

from coordinator.strategies import ModelAverage, RoundUpdates, RunningSum, make_strategy, round_lr
from simulation.config import SimConfig
from simulation.processes import SINGLE_THREADED

Weights = dict[str, np.ndarray]


@dataclass
class StackedOptions:
    topk_fraction: float | None = None
    server_momentum: float | None = None
    feddyn_alpha: float = 0.01  # strategy feddyn only
    lr_schedule: str = "constant"  # device lr over rounds (coordinator/strategies/lr_schedule.py)
    lr_final: float = 0.0  # the schedule's last-round lr as a fraction of --lr
    server_average: float | None = None  # publish a moving average of the global models (model_average.py)
    restricted_softmax: float | None = None  # FedRS's alpha on devices' absent classes (stacked.py)

    @classmethod
    def from_args(cls, args: object) -> StackedOptions:
        """The options from parsed flags of the same names (pf-sim's or a bench's); a flag the parser
        lacks keeps its default, so a new option is added here once."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


# ---------------------------------------------------------------- worker side (one per process)

_WORKER: dict = {}


def _device_arrays(cfg: SimConfig, model, train, parts, device: int) -> tuple[np.ndarray, np.ndarray]:
    """A device's training samples as the agent feeds them (same hold-out split, same preprocessing)."""
    from device_agent.models import model_view
    from device_agent.personal import split_local
    from simulation.shards import device_dataset

    train_set, _ = split_local(device_dataset(train, parts, device), cfg.holdout, agent_seed(cfg, device))
    view = model_view(model, train_set)
    x, y = view.get_batch(np.arange(view.size()))
    return np.asarray(x, np.float32), np.asarray(y, np.int64)


def agent_seed(cfg: SimConfig, device: int) -> int:
    """The seed simulation/worker.py gives device `device`'s agent."""
    return cfg.seed * 100_003 + device


def _init_worker(cfg: SimConfig) -> None:
    from engine import load_model_bytes
    from engine.models import build_model_bytes
    from simulation.shards import device_indices, labels_of, load_split
    from simulation.stacked import StackedTrainer

    train = load_split(cfg.data, "train")
    _WORKER.update(
        cfg=cfg,
        model=load_model_bytes(build_model_bytes(cfg.model, cfg.seed)),
        train=train,
        parts=device_indices(labels_of(train), cfg.devices, cfg.partition, cfg.seed, cfg.samples_per_device),
        data={},
        trainer=StackedTrainer(cfg.lr, cfg.momentum, cfg.batch_size),
    )


def _train_devices(task: tuple) -> list[tuple[int, bytes, Weights | None]]:
    """Train `devices` from `base` for round `round_id`; (device, encoded update, new residual) each."""
    from protocol.deltas import TopK
    from protocol.update import decode_update, encode_update

    base, devices, round_id, encoding, topk, residuals, feddyn, lr, restrict = task
    w, cfg = _WORKER, _WORKER["cfg"]
    for d in devices:
        if d not in w["data"]:
            w["data"][d] = _device_arrays(cfg, w["model"], w["train"], w["parts"], d)
    by_size: dict[int, list[int]] = {}
    for d in devices:
        by_size.setdefault(len(w["data"][d][1]), []).append(d)
    answers = []
    for group in by_size.values():
        seeds = [agent_seed(cfg, d) + round_id for d in group]
        dyn = None if feddyn is None else (feddyn[0], [feddyn[1].get(d) or _zeros(base) for d in group])
        deltas = w["trainer"].train(
            base, [w["data"][d] for d in group], seeds, cfg.epochs, feddyn=dyn, lr=lr, restrict=restrict
        )
        for i, (d, delta) in enumerate(zip(group, deltas, strict=True)):
            residual = None
            if dyn is not None:  # FedDyn's device state: g_d - alpha * delta_d, kept by the driver
                residual = {"feddyn": {k: dyn[1][i][k] - dyn[0] * v for k, v in delta.items()}}
            if topk is not None:
                delta, kept = TopK(topk).compress(delta, residuals.get(d))
                residual = {**(residual or {}), "topk": kept}
            data = encode_update(
                delta,
                sample_count=len(w["data"][d][1]),
                round_id=round_id,
                base_version=round_id - 1,
                encoding=encoding,
                topk_fraction=topk,
                rng=np.random.default_rng([cfg.seed, round_id, d]),  # int4's rounding, repeatable per run
            )
            if topk is not None:  # as the agent does: also feed back the quantization error of what was sent
                sent = decode_update(data).delta
                residual["topk"] = {n: kept[n] + delta[n] - sent[n] for n in kept}
            answers.append((d, data, residual))
    return answers


def _zeros(like: Weights) -> Weights:
    return {k: np.zeros_like(v) for k, v in like.items()}


# ---------------------------------------------------------------- driver


@contextmanager
def single_threaded_pool(cfg: SimConfig):
    """Worker processes started fresh (spawn) with one BLAS thread each: W workers on W cores,
    not W x cores threads fighting each other (the HTTP mode's workers get the same, processes.py)."""
    saved = {k: os.environ.get(k) for k in SINGLE_THREADED}
    os.environ.update(SINGLE_THREADED)
    try:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_init_worker, initargs=(cfg,))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    with pool:
        yield pool


class BackgroundEvaluator:
    """Test accuracy of each new global model, one at a time, in a thread beside the next rounds."""

    def __init__(self, cfg: SimConfig):
        from device_agent.models import model_view
        from engine import load_model_bytes
        from engine.models import build_model_bytes
        from engine.trainer import Trainer
        from simulation.shards import load_split

        model = load_model_bytes(build_model_bytes(cfg.model, cfg.seed))
        self.trainer = Trainer(model, batch_size=500)
        self.test = model_view(model, load_split(cfg.data, "test"))
        self.results: dict[int, dict] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, version: int, weights: Weights, latest: Weights | None = None) -> None:
        """Evaluate `weights`; also `latest` (the unaveraged model) when the published one differs."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(version, weights, latest), daemon=True)
        self._thread.start()

    def _run(self, version: int, weights: Weights, latest: Weights | None) -> None:
        self.trainer.set_weights({k: np.asarray(v, np.float32) for k, v in weights.items()})
        result = self.trainer.evaluate(self.test)
        if latest is not None:
            self.trainer.set_weights({k: np.asarray(v, np.float32) for k, v in latest.items()})
            result["latest_accuracy"] = self.trainer.evaluate(self.test)["accuracy"]
        with self._lock:
            self.results[version] = result

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()


class StackedSimulation:
    """Rounds of FedAvg-family training with stacked local training; same summary keys as Simulation."""

    def __init__(
        self,
        config: SimConfig,
        emit: Callable[[dict], None] | None = None,
        options: StackedOptions | None = None,
        on_round: Callable[[int], None] | None = None,
    ):
        """`on_round(n)` runs when round n's new model exists (n = 0: before the first round)."""
        config.check()
        if config.model != "lenet":
            raise ValueError(f"--stacked trains the built-in lenet only, not --model {config.model}")
        if config.fedprox_mu or config.strategy == "fedprox" or config.extra_options or config.js_agents:
            raise ValueError("--stacked does not run FedProx, DP, norm bounding or JS agents; drop --stacked for those")
        self.config, self.emit = config, emit or (lambda record: None)
        self.options = options or StackedOptions()
        self.on_round = on_round or (lambda number: None)
        self.rng = np.random.default_rng(config.seed)
        self.records: list[dict] = []

    def strategy(self):
        cfg = self.config
        server_lr = cfg.server_lr if cfg.server_lr is not None else (0.01 if cfg.strategy == "fedadam" else 1.0)
        settings = {"strategy": cfg.strategy, "server_lr": server_lr}
        if self.options.server_momentum is not None:
            settings["server_momentum"] = self.options.server_momentum
        if cfg.strategy == "feddyn":
            settings.update(feddyn_alpha=self.options.feddyn_alpha, participation=cfg.per_round / cfg.devices)
        strategy = make_strategy(settings)
        if self.options.server_average is not None:
            strategy = ModelAverage(strategy, self.options.server_average)
        return strategy

    def run(self) -> dict:
        from engine.models import build

        cfg, started = self.config, time.perf_counter()
        self.strategy_ = self.strategy()
        self.server_state: Weights = {}
        self.weights = {k: np.asarray(v.value, np.float64) for k, v in build(cfg.model, cfg.seed).params.items()}
        self.residuals: dict[int, dict[str, Weights]] = {}  # device -> its top-k residual, FedDyn state
        evaluator = BackgroundEvaluator(cfg)
        evaluator.submit(0, self.weights)
        with single_threaded_pool(cfg) as pool:
            self.on_round(0)
            for number in range(1, cfg.rounds + 1):
                self.records.append(self.one_round(pool, number))
                self.on_round(number)
                published = self.strategy_.published(self.weights, self.server_state)
                latest = None if self.options.server_average is None else self.weights
                evaluator.submit(number, published, latest)  # waits for the previous round's evaluation
                self.emit_evaluated(evaluator, number - 1)
        evaluator.wait()
        self.emit_evaluated(evaluator, cfg.rounds)
        return self.summary(evaluator.results[0], time.perf_counter() - started)

    def emit_evaluated(self, evaluator: BackgroundEvaluator, number: int) -> None:
        """Round `number`'s record, complete with its test accuracy, to `emit` (none for round 0)."""
        if number >= 1:
            record, result = self.records[number - 1], evaluator.results[number]
            record.update(accuracy=result["accuracy"], loss=result["loss"])
            if "latest_accuracy" in result:  # the unaveraged global model's, beside the published average
                record["latest_accuracy"] = result["latest_accuracy"]
            self.emit(record)

    def one_round(self, pool: ProcessPoolExecutor, number: int) -> dict:
        """Train the chosen devices in the workers, decode and aggregate their updates, step the model."""
        from protocol.update import decode_update

        cfg, started = self.config, time.perf_counter()
        chosen = [int(d) for d in self.rng.choice(cfg.devices, size=cfg.per_round, replace=False)]
        base = {k: v.astype(np.float32) for k, v in self.weights.items()}
        expected = {k: v.shape for k, v in base.items()}
        topk = self.options.topk_fraction
        shares = [chosen[i :: cfg.workers] for i in range(min(cfg.workers, len(chosen)))]
        feddyn = self.options.feddyn_alpha if cfg.strategy == "feddyn" else None
        lr = round_lr(cfg.lr, number, cfg.rounds, self.options.lr_schedule, self.options.lr_final)
        tasks = [
            (
                base, share, number, cfg.encoding, topk,
                {d: self.residuals[d].get("topk") for d in share if d in self.residuals},
                None if feddyn is None else (feddyn, {d: self.residuals.get(d, {}).get("feddyn") for d in share}),
                lr, self.options.restricted_softmax,
            )
            for share in shares
        ]  # fmt: skip
        running, norms, bytes_up = RunningSum(), [], 0
        for answers in pool.map(_train_devices, tasks):
            for device, data, residual in answers:
                if residual is not None:
                    self.residuals[device] = residual
                update = decode_update(data, expected=expected)
                bytes_up += len(data)
                delta, weight = self.strategy_.accept(update.delta, update.sample_count)
                running.add(delta, weight)
                norms.append(math.sqrt(sum(float(np.sum(np.square(v))) for v in delta.values())))
        combined = self.strategy_.aggregate(RoundUpdates(running=running, norms=norms))
        self.weights, self.server_state = self.strategy_.step(self.weights, combined, self.server_state)
        seconds = round(time.perf_counter() - started, 3)
        return {"round": number, "devices": len(chosen), "bytes_up": bytes_up, "seconds": seconds, "lr": lr}

    def summary(self, initial: dict, seconds: float) -> dict:
        round_seconds = [r["seconds"] for r in self.records]
        return {
            "rounds": len(self.records),
            "accuracy_by_round": [r["accuracy"] for r in self.records],
            "latest_accuracy_by_round": [r.get("latest_accuracy", r["accuracy"]) for r in self.records],
            "final_accuracy": self.records[-1]["accuracy"],
            "initial_accuracy": initial["accuracy"],
            "bytes_up": sum(r["bytes_up"] for r in self.records),
            "seconds": round(seconds, 2),
            "seconds_per_round": round(float(np.mean(round_seconds)), 3),
            "median_seconds_per_round": round(float(np.median(round_seconds)), 3),
            "mode": "stacked",
            "workers": self.config.workers,
            "cpus": os.cpu_count(),
            "config": self.config.describe(),
        }

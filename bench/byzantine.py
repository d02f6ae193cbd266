"""Hostile devices: final accuracy of plain FedAvg and each robust strategy when 20% of the devices
attack, beside the attack-free run.

100 devices share an IID partition of the embedded Fashion-MNIST subset (or --data). Devices
0..19 are attackers, in three kinds: sign-flipped and scaled updates (-10 x their honest delta),
random-noise updates (N(0, 0.5^2) per weight), and label flipping on their own data (y -> 9 - y,
then honest training). Every round samples a cohort with exactly 20% attackers (the attack kinds
in turn), the same cohorts for every strategy. Local training is the engine's Trainer; aggregation
is the coordinator's strategy classes in-process (no HTTP), with the same seeds for every run.

    python bench/byzantine.py --json     # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from coordinator.settings import RoundSettings  # noqa: E402
from coordinator.strategies import make_strategy  # noqa: E402
from coordinator.strategies.influence import bounded, round_limits  # noqa: E402
from engine.data import MnistDataset, Subset, load_default, parse_partition  # noqa: E402
from engine.data.dataview import ArrayDataset  # noqa: E402
from engine.models import build  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from protocol.deltas import clip_by_l2 as clip  # noqa: E402

ATTACKS = ("sign_flip", "noise", "label_flip")
RUNS = {  # name -> (strategy config, attackers active, server-side norm bound)
    "attack_free": ({"strategy": "fedavg"}, False, None),
    "fedavg": ({"strategy": "fedavg"}, True, None),
    "fedavg+norm_bound": ({"strategy": "fedavg"}, True, "auto"),
    # the coordinator's default since issue 12: FedAvg under the influence bound (strategies/influence.py)
    "fedavg+default_bound": ({"strategy": "fedavg"}, True, "influence"),
    "median": ({"strategy": "median"}, True, None),
    "trimmed_mean": ({"strategy": "trimmed_mean", "trim_beta": 0.2}, True, None),
    "krum": ({"strategy": "krum", "krum_f": 2}, True, None),
    "multikrum": ({"strategy": "multikrum", "krum_f": 2, "krum_m": 5}, True, None),
}


def load_data(path: str | None):
    if path:
        return MnistDataset(path, split="train"), MnistDataset(path, split="test")
    return load_default("train"), load_default("test")


def attack_of(device: int, n_attackers: int) -> str | None:
    return ATTACKS[device % len(ATTACKS)] if device < n_attackers else None


def cohorts(args) -> list[list[int]]:
    """Per round: exactly round(20%) attackers, the rest honest, drawn with one seed for every run."""
    rng = np.random.default_rng(args.seed)
    n_attackers = int(round(args.attacker_fraction * args.devices))
    per_round_bad = int(round(args.attacker_fraction * args.per_round))
    rounds = []
    for _ in range(args.rounds):
        bad = rng.choice(n_attackers, per_round_bad, replace=False)
        good = rng.choice(np.arange(n_attackers, args.devices), args.per_round - per_round_bad, replace=False)
        rounds.append(sorted(int(d) for d in np.concatenate([bad, good])))
    return rounds


def run(name: str, args) -> dict:
    """One federated training run under one strategy; returns its final test accuracy."""
    config, attacked, norm_bound = RUNS[name]
    warnings.simplefilter("ignore", RuntimeWarning)  # overflow while FedAvg collapses is the expected result
    train, test = load_data(args.data)
    labels = np.asarray(train.get_batch(np.arange(train.size()))[1])
    parts = parse_partition(args.partition)(labels, args.devices, args.seed)
    n_attackers = int(round(args.attacker_fraction * args.devices))
    model = build("lenet", seed=args.seed)
    trainer = Trainer(model, optimizer=SGD(args.lr, momentum=0.9), batch_size=args.batch_size, seed=args.seed)
    strategy = make_strategy(config)
    weights = {k: v.copy() for k, v in trainer.get_weights().items() if k in model.trainable}
    state: dict = {}
    noise_rng = np.random.default_rng(args.seed + 1)
    diverged = 0
    reference: tuple[list[float], list[int]] = ([], [])  # the last round's norms and counts
    for cohort in cohorts(args):
        updates = []
        for dev in cohort:
            attack = attack_of(dev, n_attackers) if attacked else None
            data = Subset(train, parts[dev])
            if attack == "label_flip":
                x, y = data.get_batch(np.arange(data.size()))
                data = ArrayDataset(x, 9 - np.asarray(y))
            trainer.set_weights(weights)
            for buf in getattr(trainer.optimizer, "state", {}).values():  # a fresh device optimizer
                buf.value[...] = 0
            try:
                trainer.fit(data, epochs=args.epochs)
            except FloatingPointError:  # the global model is already wrecked: this device has nothing to send
                diverged += 1
                continue
            new = trainer.get_weights()
            delta = {k: np.asarray(new[k], np.float64) - weights[k] for k in weights}
            if attack == "sign_flip":
                delta = {k: -10.0 * v for k, v in delta.items()}
            elif attack == "noise":
                delta = {k: noise_rng.normal(0, 0.5, v.shape) for k, v in delta.items()}
            updates.append((delta, data.size()))
        if not updates:
            continue
        if norm_bound == "influence":  # as the coordinator's lifecycle does: limits from the last round
            norms, counts = [clip(d, np.inf)[1] for d, _ in updates], [n for _, n in updates]
            config = RoundSettings(influence_model_fraction=args.influence_model_fraction)
            limits = round_limits(config, list(weights.values()), *reference)
            reference = (norms, counts)
            updates = bounded(updates, limits)
        elif norm_bound == "auto":  # an operator's bound: a few times the typical honest norm of round 1
            norm_bound = args.norm_bound or 3.0 * float(np.median([clip(d, np.inf)[1] for d, _ in updates]))
        if norm_bound is not None and norm_bound != "influence":
            updates = [(clip(d, norm_bound)[0], n) for d, n in updates]
        combined = strategy.combine(updates)
        new_weights, state = strategy.step(weights, combined, state)
        weights = {k: np.asarray(v, np.float32) for k, v in new_weights.items()}
    trainer.set_weights(weights)
    result = trainer.evaluate(Subset(test, np.arange(min(args.test_size, test.size()))))
    finite = all(np.all(np.isfinite(w)) for w in weights.values())
    return {
        "run": name,
        "accuracy": round(float(result["accuracy"]), 4) if finite else 0.0,
        "diverged_local_trainings": diverged,
        "finite": finite,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an IDX directory with train/test splits (default: embedded subset)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--attacker-fraction", type=float, default=0.2)
    parser.add_argument("--per-round", type=int, default=10, help="devices per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--norm-bound", type=float, default=None, help="fedavg+norm_bound (default: auto)")
    parser.add_argument(
        "--influence-model-fraction", type=float, default=0.2, help="fedavg+default_bound: as the coordinator's"
    )
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run, names, [args] * len(names)))
    accuracy = {r["run"]: r["accuracy"] for r in results}
    base = accuracy.get("attack_free")
    out = {
        "devices": args.devices,
        "attackers": int(round(args.attacker_fraction * args.devices)),
        "attacks": list(ATTACKS),
        "rounds": args.rounds,
        "per_round": args.per_round,
        "accuracy": accuracy,
        "collapsed": [r["run"] for r in results if not r["finite"] or r["diverged_local_trainings"]],
        "seconds": round(time.perf_counter() - start, 1),
    }
    if base is not None:
        out["gap_to_attack_free_points"] = {
            n: round(100 * (base - a), 2) for n, a in accuracy.items() if n != "attack_free"
        }
        out["within_3_points"] = [n for n, gap in out["gap_to_attack_free_points"].items() if gap <= 3.0]
    if not args.json:
        for name, acc in accuracy.items():
            print(f"{name:20s} {acc:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

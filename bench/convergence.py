"""Convergence of FedAvg on the full Fashion-MNIST, the FedAvg paper's setting (McMahan et al. 2017):
LeNet, 100 devices of 600 samples, 10 devices per round (C=0.1), E=5 local epochs, B=10, for the IID
and the pathological 2-shards-per-device split; beside centralized training of the same model for the
same number of sample passes (rounds x 10 devices x E x 600).

    python bench/convergence.py --json                      # 50 rounds each, ~25 min on 2 cores
    python bench/convergence.py --json --rounds 20 --splits iid
    python bench/convergence.py --json --stacked --strategies fedavg,fedavgm --splits shards:2 --no-centralized

The federated runs take the real path: `pf-sim`'s Simulation, i.e. a coordinator process and agent
worker processes over HTTP on loopback; with --stacked, `pf-sim --stacked`'s in-process loop (the
same local math and strategy classes, several times faster). --strategies runs each named
strategy (coordinator/strategies; fedavgm takes --server-momentum and --server-lr) on each split;
--lr-schedule cosine (--stacked) decays the device lr from --lr to --lr-final x --lr over the rounds;
--server-average D publishes (and evaluates) a moving average of the global models (the latest model's
figures are reported beside, as latest_*); --restricted-softmax A trains devices with FedRS's restricted
softmax; --seeds 0,1 repeats each federated run per seed.
Devices keep no held-out part here (--holdout 0, all 600
samples train), so personal accuracy is not measured. One JSON line per split and one for the
centralized run: rounds to 75% / 85% test accuracy (null = not reached), final accuracy, seconds.
For orientation, the paper's MNIST CNN reached 99% in 20 rounds (IID) and 229 rounds (2 shards).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: BLAS threads only fight the workers for cores

import numpy as np  # noqa: E402

from simulation.config import SimConfig  # noqa: E402
from simulation.simulation import Simulation  # noqa: E402
from simulation.stacked_sim import StackedOptions, StackedSimulation  # noqa: E402

FULL = "/usr/share/datasets/fashion-mnist"
TARGETS = (0.75, 0.80, 0.85)


def rounds_to(accuracies: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def federated(split: str, strategy: str, seed: int, args: argparse.Namespace) -> dict:
    momentum = {"server_momentum": args.server_momentum} if args.server_momentum is not None else {}
    config = SimConfig(
        strategy=strategy,
        server_lr=args.server_lr,
        extra_options={} if args.stacked else momentum,
        devices=100,
        per_round=10,
        rounds=args.rounds,
        epochs=5,
        batch_size=10,
        lr=args.lr,
        momentum=args.momentum,
        partition=split,
        seed=seed,
        data=args.data,
        workers=args.workers,
        holdout=0.0,
        samples_per_device=600,
        progress=not args.json,
    )
    started = time.perf_counter()
    emit = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731
    if args.stacked:
        options = StackedOptions.from_args(args)
        sim = StackedSimulation(config, emit, options)
    else:
        sim = Simulation(config, emit)
    summary = sim.run()
    acc = summary["accuracy_by_round"]
    return {
        "run": f"{strategy}{'' if args.restricted_softmax is None else '+fedrs'}"
        f"{'' if args.server_average is None else '+average'}/{split}",
        "seed": seed,
        "server_lr": args.server_lr,
        "server_momentum": args.server_momentum if strategy == "fedavgm" else None,
        "feddyn_alpha": args.feddyn_alpha if strategy == "feddyn" else None,
        "server_average": args.server_average,
        "restricted_softmax": args.restricted_softmax,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule if args.stacked else "constant",
        "lr_final": args.lr_final if args.stacked and args.lr_schedule != "constant" else None,
        "peak_accuracy": round(max(acc), 4),
        "peak_round": int(np.argmax(acc)) + 1,
        "rounds": summary["rounds"],
        "final_accuracy": summary["final_accuracy"],
        **{f"rounds_to_{int(t * 100)}": rounds_to(acc, t) for t in TARGETS},
        "accuracy_by_round": [round(a, 4) for a in acc],
        **latest_model(summary),
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary.get("bytes_down"),
        "seconds": round(time.perf_counter() - started, 1),
        "seconds_per_round": summary["seconds_per_round"],
        "path": "pf-sim --stacked" if args.stacked else "pf-sim over HTTP",
    }


def latest_model(summary: dict) -> dict:
    """With --server-average the published model is the average; the latest global model's figures too."""
    latest = summary.get("latest_accuracy_by_round")
    if latest is None or latest == summary["accuracy_by_round"]:
        return {}
    return {
        "latest_peak_accuracy": round(max(latest), 4),
        **{f"latest_rounds_to_{int(t * 100)}": rounds_to(latest, t) for t in TARGETS},
        "latest_accuracy_by_round": [round(a, 4) for a in latest],
    }


def centralized(args: argparse.Namespace) -> dict:
    """One model, all training data, the same sample passes; evaluated at every round's worth of them."""
    from engine import load_model_bytes
    from engine.data import Subset, open_dataset
    from engine.models import build_model_bytes
    from engine.optimizer import SGD
    from engine.trainer import Trainer

    started = time.perf_counter()
    train, test = open_dataset(args.data, split="train"), open_dataset(args.data, split="test")
    model = load_model_bytes(build_model_bytes("lenet", args.seed))
    trainer = Trainer(model, optimizer=SGD(args.lr, momentum=args.momentum), batch_size=10, seed=args.seed)
    per_round = 10 * 5 * 600  # sample passes of one federated round
    rng = np.random.default_rng(args.seed)
    order, accuracies = np.empty(0, np.int64), []
    for _ in range(args.rounds):
        while len(order) < per_round:
            order = np.concatenate([order, rng.permutation(train.size())])
        chunk, order = order[:per_round], order[per_round:]
        trainer.fit(Subset(train, np.sort(chunk)), 1)
        accuracies.append(float(trainer.evaluate(test)["accuracy"]))
        print(
            json.dumps({"centralized_round_equivalent": len(accuracies), "accuracy": accuracies[-1]}),
            file=sys.stderr,
            flush=True,
        )
    return {
        "run": "centralized",
        "rounds": args.rounds,
        "final_accuracy": accuracies[-1],
        **{f"rounds_to_{int(t * 100)}": rounds_to(accuracies, t) for t in TARGETS},
        "accuracy_by_round": [round(a, 4) for a in accuracies],
        "sample_passes": per_round * args.rounds,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=FULL, help="IDX directory with the full Fashion-MNIST")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--splits", default="iid,shards:2")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds: each federated run once per seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-centralized", action="store_true")
    parser.add_argument("--strategies", default="fedavg", help="comma-separated strategy names")
    parser.add_argument("--server-lr", type=float, default=None)
    parser.add_argument("--server-momentum", type=float, default=None, help="fedavgm (default 0.9)")
    parser.add_argument("--stacked", action="store_true", help="pf-sim --stacked's in-process loop")
    parser.add_argument("--feddyn-alpha", type=float, default=0.01, help="feddyn (--stacked only)")
    parser.add_argument("--lr-schedule", default="constant", help="device lr over rounds: constant|cosine (--stacked)")
    parser.add_argument("--lr-final", type=float, default=0.0, help="cosine's last-round fraction of --lr")
    parser.add_argument(
        "--server-average", type=float, default=None, help="publish a moving average of the models (--stacked)"
    )
    parser.add_argument("--restricted-softmax", type=float, default=None, help="FedRS alpha on devices (--stacked)")
    parser.add_argument("--json", action="store_true", help="one JSON line per run on stdout")
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"convergence: {args.data} not found; install the full Fashion-MNIST or pass --data")
    if (args.server_average is not None or args.restricted_softmax is not None) and not args.stacked:
        sys.exit("convergence: --server-average and --restricted-softmax need --stacked")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    runs = [
        lambda s=s, st=st, seed=seed: federated(s, st, seed, args)
        for s in args.splits.split(",")
        if s
        for st in args.strategies.split(",")
        if st
        for seed in seeds
    ]
    if not args.no_centralized:
        runs.append(lambda: centralized(args))
    for run in runs:
        result = run()
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(
                f"{result['run']:>16} seed {result.get('seed', args.seed)}: final {result['final_accuracy']:.4f}, "
                f"rounds to 75% "
                f"{result['rounds_to_75']}, to 80% {result['rounds_to_80']}, to 85% {result['rounds_to_85']} "
                f"({result['seconds']:.0f} s)"
            )


if __name__ == "__main__":
    main()

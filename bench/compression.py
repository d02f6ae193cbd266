"""Bytes up per device-round and accuracy, per update encoding (item 4 of issue 15).

    python bench/compression.py --json                 # 20 rounds per encoding, IID
    python bench/compression.py --rounds 5 --encodings float32,int4,int4+topk0.1
    python bench/compression.py --encodings float32,int4-bitmap+topk0.5   # issue 15 item 4's pick

FedAvg on the full Fashion-MNIST, 100 devices, 10 per round, E=5, B=10, lr 0.05, no momentum, IID,
through `pf-sim --stacked` (simulation/stacked_sim.py): every update is encoded with
protocol/update.py exactly as an agent sends it (top-k keeps error feedback per device across its
rounds and, as the agent does, feeds back the quantization error too; int4 rounds stochastically),
decoded by the same reader the coordinator uses, and only then averaged; so bytes are real wire
bytes and accuracy pays for every quantization error. One JSON line per encoding on stderr; the
last line on stdout: {"float32_bytes_per_device_round", "encodings": [{"encoding",
"bytes_per_device_round", "fraction_of_float32", "final_accuracy", "accuracy_lost_points", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from simulation.config import SimConfig  # noqa: E402
from simulation.stacked_sim import StackedOptions, StackedSimulation  # noqa: E402

FULL = "/usr/share/datasets/fashion-mnist"
DEFAULT = "float32,int8,int4,int8+topk0.1,int4+topk0.1,int4-bitmap+topk0.5"


def parse(spec: str) -> tuple[str, float | None]:
    """ "int4+topk0.1" -> ("int4", 0.1); "int8" -> ("int8", None)."""
    encoding, _, topk = spec.partition("+topk")
    return encoding, (float(topk) if topk else None)


def run(spec: str, args: argparse.Namespace) -> dict:
    encoding, topk = parse(spec)
    config = SimConfig(
        devices=100, per_round=10, rounds=args.rounds, epochs=5, batch_size=10, lr=0.05, momentum=0.0,
        partition="iid", encoding=encoding, seed=args.seed, data=args.data, workers=args.workers, progress=False,
    )  # fmt: skip
    summary = StackedSimulation(config, options=StackedOptions(topk_fraction=topk)).run()
    acc = summary["accuracy_by_round"]
    return {
        "encoding": spec,
        "bytes_per_device_round": summary["bytes_up"] / (args.rounds * config.per_round),
        "final_accuracy": acc[-1],
        "mean_last_3": round(sum(acc[-3:]) / len(acc[-3:]), 4),
        "accuracy_by_round": [round(a, 4) for a in acc],
        "seconds_per_round": summary["seconds_per_round"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--encodings", default=DEFAULT, help="comma-separated: ENCODING[+topkFRACTION]")
    parser.add_argument("--data", default=FULL)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    specs = [s for s in args.encodings.split(",") if s]
    if specs[0] != "float32":
        specs.insert(0, "float32")  # the reference for bytes and accuracy
    results = []
    for spec in specs:
        results.append(run(spec, args))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    reference = results[0]
    for r in results:
        r["fraction_of_float32"] = round(r["bytes_per_device_round"] / reference["bytes_per_device_round"], 4)
        r["accuracy_lost_points"] = round(100 * (reference["final_accuracy"] - r["final_accuracy"]), 2)
    out = {
        "rounds": args.rounds,
        "float32_bytes_per_device_round": reference["bytes_per_device_round"],
        "encodings": results,
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()

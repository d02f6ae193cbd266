"""pocketfed's simulation against Flower 1.42's, same configuration, same session.

    python bench/vs_flower.py --rounds 8 --json
    python bench/vs_flower.py --rounds 3 --flower-python /path/to/venv/bin/python

FedAvg, 100 devices, 10 per round, E=5, B=10, IID, full Fashion-MNIST, lr 0.05, no momentum, the
padded LeNet, the same initial weights, partition and per-device hold-out (0.2) on both sides.
pocketfed runs `pf-sim --stacked` (simulation/stacked_sim.py: stacked local training, updates through
the wire format, server evaluation off the critical path); Flower runs bench/flower_fedavg.py in its
own venv (`pip install -r bench/requirements-flower.txt`), as a subprocess, with Ray's default of
one CPU per client. Without Flower the script says so and reports pocketfed alone (ratio null).
Last line: {"pocketfed_s_per_round", "flower_s_per_round", "ratio", "pocketfed_accuracy_by_round",
"flower_accuracy_by_round", ...}; `ratio` is of wall seconds per round (mean over rounds), and
`cpu_ratio` of CPU seconds per round of each side's whole process tree (bench/proc_cpu.py), which
a shared machine's load distorts far less.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from proc_cpu import tree_cpu_seconds  # noqa: E402

from simulation.config import SimConfig  # noqa: E402
from simulation.stacked_sim import StackedSimulation  # noqa: E402

FULL = "/usr/share/datasets/fashion-mnist"
FLOWER_PYTHONS = (ROOT / ".flower-venv/bin/python", Path("/work/flower-venv/bin/python"))


def flower_python(given: str | None) -> Path | None:
    if given:
        return Path(given)
    if os.environ.get("PF_FLOWER_PYTHON"):
        return Path(os.environ["PF_FLOWER_PYTHON"])
    return next((p for p in FLOWER_PYTHONS if p.exists()), None)


def run_flower(python: Path, settings: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}", RAY_DEDUP_LOGS="0")
    proc = subprocess.run(
        [str(python), str(ROOT / "bench/flower_fedavg.py"), json.dumps(settings)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"vs_flower: Flower's run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--data", default=FULL)
    p.add_argument("--workers", type=int, default=2, help="pocketfed's training processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flower-python", default=None, help="the Flower venv's python (default: .flower-venv)")
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    settings = dict(
        devices=100, per_round=10, rounds=args.rounds, epochs=5, batch_size=10, lr=0.05, momentum=0.0,
        partition="iid", seed=args.seed, data=args.data, holdout=0.2,
    )  # fmt: skip
    config = SimConfig(**settings, workers=args.workers, progress=False)
    cpu_marks: list[float] = []
    pocketfed = StackedSimulation(
        config,
        emit=lambda r: print(json.dumps(r), file=sys.stderr, flush=True),
        on_round=lambda number: cpu_marks.append(tree_cpu_seconds()),
    ).run()
    pocketfed_cpu = (cpu_marks[-1] - cpu_marks[0]) / args.rounds
    result = {
        "pocketfed_s_per_round": pocketfed["seconds_per_round"],
        "flower_s_per_round": None,
        "pocketfed_median_s_per_round": pocketfed["median_seconds_per_round"],
        "pocketfed_cpu_s_per_round": round(pocketfed_cpu, 3),
        "ratio": None,
        "pocketfed_accuracy_by_round": [round(a, 4) for a in pocketfed["accuracy_by_round"]],
        "flower_accuracy_by_round": None,
    }
    python = None if args.skip_flower else flower_python(args.flower_python)
    if python is None or not python.exists():
        print(
            "vs_flower: Flower is not installed (no .flower-venv; create one with "
            "`python3 -m venv .flower-venv && .flower-venv/bin/pip install -r bench/requirements-flower.txt` "
            "or pass --flower-python); reporting pocketfed alone",
            file=sys.stderr,
        )
    else:
        flower = run_flower(python, settings)
        result.update(
            flower_s_per_round=round(flower["s_per_round"], 3),
            ratio=round(pocketfed["seconds_per_round"] / flower["s_per_round"], 3),
            flower_median_s_per_round=round(flower["median_s_per_round"], 3),
            flower_cpu_s_per_round=round(flower["cpu_s_per_round"], 3),
            cpu_ratio=round(pocketfed_cpu / flower["cpu_s_per_round"], 3),
            flower_accuracy_by_round=[round(a, 4) for a in flower["accuracy_by_round"]],
            flower_version=flower["flwr"],
        )
    result.update(rounds=args.rounds, pocketfed_mode="pf-sim --stacked", workers=args.workers, cpus=os.cpu_count())
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()

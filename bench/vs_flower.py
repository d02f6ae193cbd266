"""pocketfed's simulation against Flower 1.42's, same configuration, alternated in one run.

    python bench/vs_flower.py --rounds 5 --json                  # 2 repetitions per side, ABBA order
    python bench/vs_flower.py --rounds 3 --repeats 4 --flower-python /path/to/venv/bin/python

FedAvg, 100 devices, 10 per round, E=5, B=10, IID, full Fashion-MNIST, lr 0.05, no momentum, the
padded LeNet, the same initial weights, partition and per-device hold-out (0.2) on both sides.
pocketfed runs `pf-sim --stacked` (simulation/stacked_sim.py: stacked local training, updates through
the wire format, server evaluation off the critical path) in a child process; Flower runs
bench/flower_fedavg.py in its own venv (`pip install -r bench/requirements-flower.txt`, found at
.flower-venv, /work/flower-venv, $PF_FLOWER_PYTHON or --flower-python), with Ray's default of one
CPU per client. Without Flower the script says so and reports pocketfed alone (ratio null).

A shared machine's load moves during a run, so the sides alternate: `--repeats` runs each, in ABBA
order (pocketfed, Flower, Flower, pocketfed, ...), every run a fresh process tree. Per run and side:
wall seconds per round (between consecutive rounds' new models: pocketfed's `on_round`, Flower's
`evaluate_fn`), CPU seconds per round of the side's whole process tree (bench/proc_cpu.py; Ray's GCS,
raylet and actors included) and the 1-minute load average at each round. `ratio` is pocketfed's
mean wall seconds per round over Flower's (means over all runs), `cpu_ratio` the same for CPU
seconds, `paired_ratios` the wall ratio of each adjacent pocketfed/Flower pair; `steady_*` leave
out round 1, which on both sides also starts the training processes (Ray's actors) and loads data.
Last line: {"pocketfed_s_per_round", "flower_s_per_round", "ratio", "pocketfed_accuracy_by_round",
"flower_accuracy_by_round", "cpu_ratio", ..., "runs": [...]}.
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

import numpy as np  # noqa: E402

FULL = "/usr/share/datasets/fashion-mnist"
FLOWER_PYTHONS = (ROOT / ".flower-venv/bin/python", Path("/work/flower-venv/bin/python"))


def flower_python(given: str | None) -> Path | None:
    if given:
        return Path(given)
    if os.environ.get("PF_FLOWER_PYTHON"):
        return Path(os.environ["PF_FLOWER_PYTHON"])
    return next((p for p in FLOWER_PYTHONS if p.exists()), None)


def _last_json(proc: subprocess.CompletedProcess, side: str) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"vs_flower: {side}'s run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_flower(python: Path, settings: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'bench'}", RAY_DEDUP_LOGS="0")
    proc = subprocess.run(
        [str(python), str(ROOT / "bench/flower_fedavg.py"), json.dumps(settings)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    found = _last_json(proc, "Flower")
    return _per_round(found["round_marks"], found["cpu_marks"], found["load_marks"], found["accuracy_by_round"]) | {
        "flwr": found["flwr"]
    }


def run_pocketfed(settings: dict, workers: int) -> dict:
    """`pf-sim --stacked` in a fresh child process (its own process tree, as Flower's)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--_pocketfed", json.dumps({**settings, "workers": workers})],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return _last_json(proc, "pocketfed")


def _pocketfed_child(settings: dict) -> None:
    import time

    from proc_cpu import tree_cpu_seconds

    from simulation.config import SimConfig
    from simulation.stacked_sim import StackedSimulation

    marks: list[float] = []
    cpu: list[float] = []
    load: list[float] = []

    def on_round(number: int) -> None:
        marks.append(time.perf_counter())
        cpu.append(tree_cpu_seconds())  # this process, its training workers and the evaluator thread
        load.append(os.getloadavg()[0])

    config = SimConfig(**settings, progress=False)
    emit = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731
    summary = StackedSimulation(config, emit=emit, on_round=on_round).run()
    print(json.dumps(_per_round(marks, cpu, load, summary["accuracy_by_round"])), flush=True)


def _per_round(marks: list[float], cpu: list[float], load: list[float], accuracy: list[float]) -> dict:
    rounds = len(marks) - 1
    if rounds < 1:
        raise SystemExit("vs_flower: a run finished no round")
    return {
        "s_per_round": (marks[-1] - marks[0]) / rounds,
        "median_s_per_round": float(np.median(np.diff(marks))),
        "cpu_s_per_round": (cpu[-1] - cpu[0]) / rounds,
        # without round 1, which also pays for starting workers / actors and loading their data
        "steady_s_per_round": (marks[-1] - marks[1]) / (rounds - 1) if rounds > 1 else None,
        "steady_cpu_s_per_round": (cpu[-1] - cpu[1]) / (rounds - 1) if rounds > 1 else None,
        "load": float(np.mean(load)),
        "accuracy_by_round": [round(float(a), 4) for a in accuracy],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternated in ABBA order")
    p.add_argument("--data", default=FULL)
    p.add_argument("--workers", type=int, default=2, help="pocketfed's training processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flower-python", default=None, help="the Flower venv's python (default: see above)")
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--_pocketfed", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._pocketfed:
        _pocketfed_child(json.loads(args._pocketfed))
        return
    if args.repeats < 1 or args.rounds < 1:
        raise SystemExit("vs_flower: --rounds and --repeats must be at least 1")
    settings = dict(
        devices=100, per_round=10, rounds=args.rounds, epochs=5, batch_size=10, lr=0.05, momentum=0.0,
        partition="iid", seed=args.seed, data=args.data, holdout=0.2,
    )  # fmt: skip
    python = None if args.skip_flower else flower_python(args.flower_python)
    if python is None or not python.exists():
        python = None
        print(
            "vs_flower: Flower is not installed (no .flower-venv or /work/flower-venv; create one with "
            "`python3 -m venv /work/flower-venv && /work/flower-venv/bin/pip install -r bench/requirements-flower.txt` "
            "or pass --flower-python); reporting pocketfed alone",
            file=sys.stderr,
        )
    sides = ["pocketfed"] if python is None else ["pocketfed", "flower"]
    runs: list[dict] = []
    for rep in range(args.repeats):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            load_before = os.getloadavg()[0]
            found = run_pocketfed(settings, args.workers) if side == "pocketfed" else run_flower(python, settings)
            runs.append({"side": side, "load_before": round(load_before, 2), **found})
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in runs[-1].items()}
            print(json.dumps(shown), file=sys.stderr, flush=True)
    print(json.dumps(summarize(runs, args)) if args.json else json.dumps(summarize(runs, args), indent=2), flush=True)


def summarize(runs: list[dict], args: argparse.Namespace) -> dict:
    def mean(side: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["side"] == side and r[key] is not None]
        return round(float(np.mean(values)), 3) if values else None

    pf = [r for r in runs if r["side"] == "pocketfed"]
    fl = [r for r in runs if r["side"] == "flower"]
    result: dict = {
        "pocketfed_s_per_round": mean("pocketfed", "s_per_round"),
        "flower_s_per_round": mean("flower", "s_per_round"),
        "ratio": None,
        "pocketfed_cpu_s_per_round": mean("pocketfed", "cpu_s_per_round"),
        "flower_cpu_s_per_round": mean("flower", "cpu_s_per_round"),
        "cpu_ratio": None,
        "pocketfed_steady_s_per_round": mean("pocketfed", "steady_s_per_round"),
        "flower_steady_s_per_round": mean("flower", "steady_s_per_round"),
        "steady_ratio": None,
        "steady_cpu_ratio": None,
        "pocketfed_median_s_per_round": mean("pocketfed", "median_s_per_round"),
        "flower_median_s_per_round": mean("flower", "median_s_per_round"),
        "pocketfed_load": mean("pocketfed", "load"),
        "flower_load": mean("flower", "load"),
        "pocketfed_accuracy_by_round": pf[0]["accuracy_by_round"],
        "flower_accuracy_by_round": fl[0]["accuracy_by_round"] if fl else None,
    }
    if fl:
        result["ratio"] = round(result["pocketfed_s_per_round"] / result["flower_s_per_round"], 3)
        result["cpu_ratio"] = round(result["pocketfed_cpu_s_per_round"] / result["flower_cpu_s_per_round"], 3)
        if args.rounds > 1:
            result["steady_ratio"] = round(
                result["pocketfed_steady_s_per_round"] / result["flower_steady_s_per_round"], 3
            )
            result["steady_cpu_ratio"] = round(
                mean("pocketfed", "steady_cpu_s_per_round") / mean("flower", "steady_cpu_s_per_round"), 3
            )
        result["paired_ratios"] = [
            round(a["s_per_round"] / b["s_per_round"], 3) for a, b in zip(pf, fl)
        ]  # run k of each side: adjacent in the ABBA order
        # Flower samples each round's clients without a seed: its accuracy moves from run to run
        flower_mean = np.mean([r["accuracy_by_round"] for r in fl], axis=0)
        result["flower_accuracy_mean_by_round"] = [round(float(a), 4) for a in flower_mean]
        result["accuracy_diff_by_round"] = [
            round(float(a - b), 4) for a, b in zip(pf[0]["accuracy_by_round"], flower_mean)
        ]  # pocketfed (the same every run) minus Flower's mean over its runs
        result["flower_version"] = fl[0]["flwr"]
    for side, found in (("pocketfed", pf), ("flower", fl)):
        if found:
            result[f"{side}_accuracy_same_across_runs"] = all(
                r["accuracy_by_round"] == found[0]["accuracy_by_round"] for r in found
            )
    result.update(
        rounds=args.rounds,
        repeats=args.repeats,
        order="ABBA (pocketfed first)",
        pocketfed_mode="pf-sim --stacked",
        workers=args.workers,
        cpus=os.cpu_count(),
        runs=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in runs],
    )
    return result


if __name__ == "__main__":
    main()

"""Scale: a 1,000-device fleet, 100 devices per round, on this machine, through the real path
(coordinator process + agent worker processes over HTTP). Reports seconds per round and the
coordinator's peak memory (VmHWM from /proc).

    python bench/scale.py --json                 # 1000 devices, 100 per round, 3 rounds
    python bench/scale.py --devices 300 --per-round 30 --rounds 2

Uses the full Fashion-MNIST when installed (60 samples per device), else the embedded subset.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.config import SimConfig  # noqa: E402
from simulation.simulation import Simulation  # noqa: E402

FULL = "/usr/share/datasets/fashion-mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default=FULL if Path(FULL).is_dir() else None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = SimConfig(
        devices=args.devices,
        per_round=args.per_round,
        rounds=args.rounds,
        data=args.data,
        workers=args.workers,
        progress=not args.json,
    )
    sim = Simulation(config, emit=lambda r: print(json.dumps(r), file=sys.stderr, flush=True))
    summary = sim.run()
    result = {
        "bench": "scale",
        "devices": args.devices,
        "per_round": args.per_round,
        "rounds": summary["rounds"],
        "workers": args.workers,
        "data": args.data or "embedded",
        "seconds_per_round": summary["seconds_per_round"],
        "seconds_per_round_each": [r["seconds"] for r in sim.records],
        "coordinator_peak_rss_mib": summary["coordinator_peak_rss_mib"],
        "worker_peak_rss_mib": summary["worker_peak_rss_mib"],
        "accuracy_by_round": summary["accuracy_by_round"],
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "seconds": summary["seconds"],
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()), flush=True)


if __name__ == "__main__":
    main()

"""Chaos benchmark: federated training through agent kills, coordinator SIGKILL + restarts and a
fault-injecting network, then an audit of the coordinator's books (coordinator/audit.py).

    python bench/chaos.py --json
    python bench/chaos.py --baseline --json      # + the same fleet without faults, for its final accuracy
    python bench/chaos.py --devices 12 --per-round 4 --rounds 8 --agent-kills 6 --coordinator-restarts 4 --json

With --json the last stdout line is {"agent_kills", "coordinator_restarts", "acknowledged", "lost",
"double_counted", "final_accuracy", "initial_accuracy", "versions_recomputed", "proxy": {...}, ...}.
Exit status 1 when the audit found a problem (anything lost or double-counted, a version that does
not recompute), 2 on bad options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation.chaos import ChaosConfig, chaos_hooks  # noqa: E402
from simulation.config import SimConfig  # noqa: E402
from simulation.processes import SimulationError  # noqa: E402
from simulation.simulation import Simulation  # noqa: E402

HEADLINE = ("agent_kills", "coordinator_restarts", "acknowledged", "lost", "double_counted", "final_accuracy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--agent-kills", type=int, default=6)
    p.add_argument("--coordinator-restarts", type=int, default=4)
    p.add_argument("--no-proxy-faults", action="store_true", help="relay and record only")
    p.add_argument("--partition", default="iid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep DB, logs, device state and the wire record here")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run the same fleet without any fault and report its final accuracy",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        config = SimConfig(
            devices=args.devices,
            per_round=args.per_round,
            rounds=args.rounds,
            workers=args.workers,
            partition=args.partition,
            seed=args.seed,
            workdir=args.workdir,
            progress=False,
        )
        chaos = ChaosConfig(
            agent_kills=args.agent_kills,
            coordinator_restarts=args.coordinator_restarts,
            proxy_faults=not args.no_proxy_faults,
        )
        sim = Simulation(
            config,
            hooks=chaos_hooks(config, chaos),
            emit=lambda r: print(
                json.dumps(r)
                if args.json
                else f"round {r['round']}: accuracy {r['accuracy']:.4f}, {r['received']} updates, "
                f"{r['agent_kills']} agent kills, {r['coordinator_restarts']} restarts so far",
                flush=True,
            ),
        )
        summary = sim.run()
        if args.baseline:
            calm_config = dataclasses.replace(config, workdir=None)  # the same fleet, in a temporary directory
            calm_chaos = ChaosConfig(agent_kills=0, coordinator_restarts=0, proxy_faults=False)
            calm = Simulation(calm_config, hooks=chaos_hooks(calm_config, calm_chaos)).run()
            summary["baseline_final_accuracy"] = calm["final_accuracy"]
            summary["baseline_seconds"] = calm["seconds"]
            # devices train deterministically: if every round had the same participants, the weights match
            summary["same_weights_as_baseline"] = calm["final_weights_sha256"] == summary["final_weights_sha256"]
    except ValueError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    except SimulationError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**{k: summary[k] for k in HEADLINE}, **summary}), flush=True)
    else:
        print(", ".join(f"{k} {summary[k]}" for k in HEADLINE) + f"; audit {'OK' if summary['audit_ok'] else 'FAILED'}")
        for problem in summary["audit_problems"]:
            print("  - " + problem)
    return 0 if summary["audit_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

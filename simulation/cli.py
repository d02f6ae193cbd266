"""`pf-sim`: simulate a fleet against a real coordinator process, over HTTP, on one machine.

    pf-sim --devices 8 --per-round 4 --rounds 6 --epochs 1 --report runs/report.html
    pf-sim --devices 1000 --per-round 100 --rounds 3 --data /usr/share/datasets/fashion-mnist --json
    pf-sim --chaos-agent-kills 4 --chaos-coordinator-restarts 3 --chaos-proxy --json   (chaos hooks, then an audit)

Progress bars go to stderr; with --json, stdout gets one JSON line per round and a last
summary line {"rounds", "accuracy_by_round", "final_accuracy", "personal_accuracy",
"bytes_up", "bytes_down", "seconds", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator.strategies import SCHEDULES, STRATEGIES
from protocol.messages import ENCODINGS
from simulation.chaos import ChaosConfig, chaos_hooks
from simulation.config import SimConfig
from simulation.processes import SimulationError
from simulation.report import write_report
from simulation.simulation import Simulation
from simulation.stacked_sim import StackedOptions, StackedSimulation

DEFAULTS = SimConfig()


def model_argument(spec: str) -> str:
    """A model file as an absolute path (the coordinator process may run elsewhere); a name as it is."""
    path = Path(spec)
    if path.exists():
        return str(path.resolve())
    if path.suffix or "/" in spec:
        raise SystemExit(f"pf-sim: --model {spec}: no such file")
    return spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pf-sim",
        description="Simulate N devices against a real coordinator "
        "process; devices run as real agents in a few worker processes.",
    )
    p.add_argument("--devices", type=int, default=DEFAULTS.devices, help="fleet size N")
    p.add_argument("--per-round", type=int, default=DEFAULTS.per_round, help="devices per round K (the goal)")
    p.add_argument("--rounds", type=int, default=DEFAULTS.rounds)
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="local epochs E")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="local batch size B")
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="device learning rate")
    p.add_argument("--momentum", type=float, default=DEFAULTS.momentum, help="device SGD momentum")
    p.add_argument(
        "--partition",
        default=DEFAULTS.partition,
        help="iid | dirichlet:ALPHA | shards:PER_DEVICE | quantity:ALPHA",
    )
    p.add_argument("--strategy", default=DEFAULTS.strategy, choices=sorted(STRATEGIES))
    p.add_argument("--server-lr", type=float, default=None, help="server learning rate (fedadam default 0.01)")
    p.add_argument("--fedprox-mu", type=float, default=None, help="FedProx proximal weight")
    p.add_argument("--encoding", default=DEFAULTS.encoding, choices=ENCODINGS, help="update encoding")
    p.add_argument(
        "--topk-fraction",
        type=float,
        default=None,
        help="devices send only this fraction of each tensor's largest entries (error feedback keeps the rest)",
    )
    p.add_argument("--server-momentum", type=float, default=None, help="FedAvgM's server momentum (default 0.9)")
    p.add_argument("--feddyn-alpha", type=float, default=0.01, help="FedDyn's regularization alpha")
    p.add_argument(
        "--lr-schedule",
        default="constant",
        choices=SCHEDULES,
        help="device lr over the rounds: constant, or cosine from --lr down to --lr-final x --lr (--stacked)",
    )
    p.add_argument("--lr-final", type=float, default=0.0, help="the lr schedule's last fraction of --lr")
    p.add_argument(
        "--restricted-softmax",
        type=float,
        default=None,
        metavar="ALPHA",
        help="FedRS: devices scale the logits of the classes they do not hold by ALPHA while training, "
        "e.g. 0.5 (simulation/stacked.py; --stacked)",
    )
    p.add_argument(
        "--server-average",
        type=float,
        default=None,
        metavar="DECAY",
        help="publish (and evaluate) a moving average of the global models over rounds with this decay, "
        "e.g. 0.9; devices still train from the latest model (coordinator/strategies/model_average.py; --stacked)",
    )
    p.add_argument(
        "--stacked",
        action="store_true",
        help="fast in-process mode: train each worker's devices as one stacked graph, no HTTP or coordinator "
        "process (same local math, wire format and strategies; simulation/stacked_sim.py)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument(
        "--model",
        default=DEFAULTS.model,
        help="the model to federate: a built-in architecture (lenet), a pocketfed model file or an .onnx file "
        "(its recorded preprocessing is what devices and the server's evaluation apply)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="IDX dataset directory with train and test splits (default: the embedded subset)",
    )
    p.add_argument("--samples-per-device", type=int, default=None, help="cap each device's share")
    p.add_argument(
        "--holdout",
        type=float,
        default=DEFAULTS.holdout,
        help="fraction of each device's data held out for personal/global accuracy",
    )
    p.add_argument("--workers", type=int, default=DEFAULTS.workers, help="device worker processes")
    p.add_argument(
        "--js-agents",
        type=int,
        default=0,
        help="play this many devices (0..N-1) with the TypeScript agent (device_agent/js: Node.js, onnxruntime-node)",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=DEFAULTS.round_timeout,
        help="the coordinator's round deadline in seconds",
    )
    p.add_argument("--workdir", default=None, help="keep logs, DB and device state here (default: temp dir)")
    p.add_argument("--db", default=None, help="coordinator SQLite file (default: in the workdir)")
    p.add_argument("--report", default=None, help="write an offline HTML report here")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    fleet = p.add_argument_group(
        "a realistic fleet",
        "who is online when, how fast devices are, who drops out (simulation/fleet.py); after each round the "
        "online devices personalize on the new version, and at the end every device is measured",
    )
    fleet.add_argument(
        "--availability",
        default=DEFAULTS.availability,
        help="always | diurnal (online only in overnight charging windows across time zones) | a CSV file of "
        "device,start_hour,end_hour (UTC)",
    )
    fleet.add_argument(
        "--hours-per-round",
        type=float,
        default=DEFAULTS.hours_per_round,
        help="simulated hours each round advances the fleet's clock (a day compressed into the run)",
    )
    fleet.add_argument(
        "--speed-spread",
        type=float,
        default=DEFAULTS.speed_spread,
        help="device speed heterogeneity: device i trains exp(S*z_i) times slower (z_i standard normal)",
    )
    privacy = p.add_argument_group(
        "privacy and robustness",
        "server-side client-level DP (coordinator/privacy.py) "
        "and norm bounding; epsilon per round goes into --json and --report",
    )
    privacy.add_argument("--dp-noise-multiplier", type=float, default=None, help="DP-FedAvg noise z (0/unset: off)")
    privacy.add_argument("--dp-clip-norm", type=float, default=None, help="DP clip C (initial C if adaptive)")
    privacy.add_argument("--dp-adaptive-clip", action="store_true", help="adaptive clipping (Andrew et al.)")
    privacy.add_argument("--dp-delta", type=float, default=None, help="delta of the (epsilon, delta) guarantee")
    privacy.add_argument("--dp-epsilon-budget", type=float, default=None, help="stop when epsilon would exceed this")
    privacy.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="SecAgg+: devices send masked updates, the coordinator learns only each round's sum",
    )
    privacy.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="with --secure-aggregation: this fraction of each round's devices vanishes after sending its "
        "masked input, before unmasking; without: each chosen device vanishes mid-training with this "
        "probability (a realistic fleet; over-selection replaces it)",
    )
    privacy.add_argument("--norm-bound", type=float, default=None, help="server clips each delta to this L2 norm")
    chaos = p.add_argument_group(
        "chaos",
        "kill agents and the coordinator, put a faulty network in between, "
        "then audit the database (simulation/chaos.py; --report works here too)",
    )
    chaos.add_argument("--chaos-agent-kills", type=int, default=0, help="SIGKILL this many agents mid-task")
    chaos.add_argument(
        "--chaos-coordinator-restarts", type=int, default=0, help="SIGKILL and restart the coordinator this many times"
    )
    chaos.add_argument(
        "--chaos-proxy",
        action="store_true",
        help="route agents through a fault proxy that refuses, delays and cuts connections",
    )
    return p


def chaos_from_args(args: argparse.Namespace) -> ChaosConfig | None:
    """A ChaosConfig when any chaos flag is given (the proxy then always records; faults only with --chaos-proxy)."""
    if not (args.chaos_agent_kills or args.chaos_coordinator_restarts or args.chaos_proxy):
        return None
    return ChaosConfig(
        agent_kills=args.chaos_agent_kills,
        coordinator_restarts=args.chaos_coordinator_restarts,
        proxy_faults=args.chaos_proxy,
    )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        devices=args.devices,
        per_round=args.per_round,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        partition=args.partition,
        strategy=args.strategy,
        encoding=args.encoding,
        seed=args.seed,
        model=model_argument(args.model),
        data=args.data,
        workers=args.workers,
        holdout=args.holdout,
        js_agents=args.js_agents,
        samples_per_device=args.samples_per_device,
        server_lr=args.server_lr,
        fedprox_mu=args.fedprox_mu,
        round_timeout=args.round_timeout,
        workdir=args.workdir,
        db=args.db,
        progress=not args.no_progress,
        availability=args.availability,
        hours_per_round=args.hours_per_round,
        speed_spread=args.speed_spread,
        secure_aggregation=args.secure_aggregation,
        dropout=args.dropout,
        extra_options=coordinator_extras(args),
    )


PASSED_THROUGH = ("dp_noise_multiplier", "dp_clip_norm", "dp_delta", "dp_epsilon_budget", "norm_bound")
TASK_OPTIONS = ("topk_fraction", "server_momentum")  # coordinator settings the round loop needs too


def coordinator_extras(args: argparse.Namespace) -> dict:
    """Coordinator settings set from pf-sim's privacy flags (only those given)."""
    extras = {name: getattr(args, name) for name in PASSED_THROUGH if getattr(args, name) is not None}
    extras.update({name: getattr(args, name) for name in TASK_OPTIONS if getattr(args, name) is not None})
    if args.dp_adaptive_clip:
        extras["dp_adaptive_clip"] = True
    if args.strategy == "feddyn":  # participation K / N: each round's devices out of the fleet
        extras.update(feddyn_alpha=args.feddyn_alpha, participation=args.per_round / args.devices)
    return extras


def human_line(record: dict) -> str:
    personal = record.get("personal_acc")
    return (
        f"round {record['round']:>3}: test accuracy {record['accuracy']:.4f}  personal "
        f"{'-' if personal is None else f'{personal:.4f}'}  up {record['bytes_up'] / 1e6:.2f} MB  "
        f"down {record.get('bytes_down', 0) / 1e6:.2f} MB  {record['seconds']:.1f} s"
        + ("" if record.get("epsilon") is None else f"  ε {record['epsilon']:.3g}")
    )


def chaos_line(record: dict) -> str:
    return (
        f"round {record['round']:>3}: test accuracy {record['accuracy']:.4f}  {record['received']} updates  "
        f"agent kills so far {record['agent_kills']}  coordinator restarts {record['coordinator_restarts']}  "
        f"{record['seconds']:.1f} s"
    )


def chaos_summary(s: dict) -> str:
    problems = "".join("\n  - " + p for p in s["audit_problems"])
    return (
        f"audit {'OK' if s['audit_ok'] else 'FAILED'}: {s['acknowledged']} acknowledged, lost {s['lost']}, "
        f"double-counted {s['double_counted']}, {s['versions_recomputed']}/{s['rounds']} versions recomputed; "
        f"{s['agent_kills']} agent kills, {s['coordinator_restarts']} coordinator restarts; accuracy "
        f"{s['initial_accuracy']:.4f} -> {s['final_accuracy']:.4f}{problems}"
    )


def stacked_simulation(args: argparse.Namespace, config: SimConfig, emit, chaos) -> StackedSimulation:
    """pf-sim --stacked: the task options go to the in-process loop, nothing else may be set."""
    if chaos is not None or args.report or args.js_agents:
        raise ValueError("--stacked runs without a coordinator: no chaos flags, no --report, no --js-agents")
    options = StackedOptions.from_args(args)
    for name in (*TASK_OPTIONS, "feddyn_alpha", "participation"):
        config.extra_options.pop(name, None)
    return StackedSimulation(config, emit, options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        from engine.data import parse_partition

        parse_partition(config.partition)
        chaos = chaos_from_args(args)
        line = human_line if chaos is None else chaos_line

        def emit(record: dict) -> None:
            print(json.dumps(record) if args.json else line(record), flush=True)

        if args.stacked:
            sim = stacked_simulation(args, config, emit, chaos)
        elif getattr(STRATEGIES[config.strategy], "device_side", False) and args.js_agents:
            raise ValueError(f"--strategy {config.strategy}: the TypeScript agent does not run its device half")
        elif args.server_average is not None or args.restricted_softmax is not None:
            raise ValueError("--server-average and --restricted-softmax run in --stacked mode only")
        else:
            sim = Simulation(config, emit, hooks=[] if chaos is None else chaos_hooks(config, chaos))
    except ValueError as exc:
        print(f"pf-sim: {exc}", file=sys.stderr)
        return 2
    try:
        summary = sim.run()
    except KeyboardInterrupt:
        print(
            f"\npf-sim: interrupted after {len(sim.records)} rounds; coordinator and workers stopped",
            file=sys.stderr,
        )
        return 130
    except SimulationError as exc:
        print(f"pf-sim: {exc}", file=sys.stderr)
        return 1
    if args.report:
        write_report(args.report, sim.records, summary)
    if chaos is not None:
        print(json.dumps(summary) if args.json else chaos_summary(summary), flush=True)
        return 0 if summary["audit_ok"] else 1
    if args.json:
        print(json.dumps(summary), flush=True)
    elif args.stacked:
        print(
            f"accuracy {summary['initial_accuracy']:.4f} -> {summary['final_accuracy']:.4f} in "
            f"{summary['rounds']} rounds, {summary['seconds_per_round']:.2f} s per round (stacked)"
        )
    else:
        print(
            f"accuracy {summary['initial_accuracy']:.4f} -> {summary['final_accuracy']:.4f} in "
            f"{summary['rounds']} rounds, {summary['seconds']:.1f} s"
            + (f"; report: {args.report}" if args.report else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

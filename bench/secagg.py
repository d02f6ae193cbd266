"""Cost of a secure-aggregation round against a plain round: in process, and over HTTP.

For cohorts of 10, 50 and 100 devices with a LeNet-sized delta (61,706 parameters, a real delta from
one local epoch on 600 embedded Fashion-MNIST samples), run the whole SecAgg+ round through
`protocol.secagg.run_round` (every message through JSON, the masked vector as its binary frame) and
report per device: bytes up, bytes down, CPU-seconds; and the server's CPU-seconds. Scenarios: no
dropout, and a third of the cohort vanishing after the share-keys phase (the server's worst case:
it rebuilds those devices' mask keys and regenerates their pairwise masks).

The reference in the same run is a plain round: each device uploads its delta in the float32 update
format (`protocol.update.encode_update`), the server decodes every update and takes the weighted
mean. Both rounds download the same model file, reported separately. The local training epoch is
timed too, since it dominates a plain device round.

Then real rounds over HTTP (bench/secagg_http.py): for 10, 50 and 100 devices, a plain round and a
secure-aggregation round against a real coordinator process: bytes up and down per device on the
wire, device CPU-s, coordinator CPU-s and the round's wall time ("http_rounds").

    python bench/secagg.py --json        # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.secagg_http import http_round  # noqa: E402
from engine.data import Subset, load_default  # noqa: E402
from engine.models import build, build_model_bytes  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from protocol.secagg import SecAggConfig, crypto, flatten, run_round, shamir  # noqa: E402
from protocol.update import decode_update, encode_update  # noqa: E402


def train_once(samples: int) -> tuple[dict[str, np.ndarray], float]:
    """(a real LeNet delta, CPU-seconds of the epoch that made it)."""
    trainer = Trainer(build("lenet", seed=0), optimizer=SGD(0.05, momentum=0.9), batch_size=32)
    base = {k: v.copy() for k, v in trainer.get_weights().items()}
    data = Subset(load_default("train"), np.arange(samples))
    start = time.process_time()
    trainer.fit(data, epochs=1)
    cpu = time.process_time() - start
    weights = trainer.get_weights()
    return {k: (weights[k] - base[k]).astype(np.float32) for k in base}, cpu


def plain_round(delta: dict[str, np.ndarray], n: int, samples: int) -> dict[str, float]:
    """Bytes and CPU of the plain path: encode on each device, decode and average on the server."""
    start = time.process_time()
    blob = encode_update(delta, sample_count=samples, round_id=1, base_version=0, encoding="float32")
    device_cpu = time.process_time() - start
    start = time.process_time()
    total, weight = None, 0
    for _ in range(n):
        update = decode_update(blob)
        flat = flatten(update.delta) * update.sample_count
        total = flat if total is None else total + flat
        weight += update.sample_count
    _ = total / weight
    return {"bytes_up": len(blob), "client_cpu_s": device_cpu, "server_cpu_s": time.process_time() - start}


def prg_throughput(length: int, repeats: int = 20, batches: int = 5) -> float:
    """MB/s of PRG output per CPU-second: the best of a few batches (other jobs share this machine)."""
    seed = bytes(range(32))
    crypto.prg(seed, length)
    best = float("inf")
    for _ in range(batches):
        start = time.process_time()
        for _ in range(repeats):
            crypto.prg(seed, length)
        best = min(best, time.process_time() - start)
    return 4 * length * repeats / best / 1e6


def shamir_ms(threshold: int, holders: int, repeats: int = 5) -> float:
    """CPU-ms to rebuild one secret from all `holders` shares (consistency of the extras checked)."""
    shares = shamir.split(bytes(32), threshold, range(1, holders + 1))
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        shamir.reconstruct(shares.items(), threshold)
        best = min(best, time.process_time() - start)
    return best * 1e3


def secagg_round(delta: np.ndarray, n: int, samples: int, dropped: int, seed: int) -> dict[str, float]:
    config = SecAggConfig.create(seed, n, delta.size)
    inputs = {i: (delta, samples) for i in range(1, n + 1)}
    drop = {"share_keys": set(range(1, dropped + 1))} if dropped else {}
    wall = time.perf_counter()
    result, trace = run_round(config, inputs, drop_after=drop, seed=seed)
    wall = time.perf_counter() - wall
    if not hasattr(result, "mean"):
        raise SystemExit(f"round abandoned: {result}")
    error = float(np.max(np.abs(result.mean - delta)))
    if error > config.quantizer.mean_error_bound(len(result.survivors), result.total_weight):
        raise SystemExit(f"the secure sum is off by {error}, beyond the quantization bound")
    stayed = [i for i in range(1, n + 1) if i > dropped]  # devices that went through all four phases
    return {
        "neighbours": config.neighbours,
        "threshold": config.threshold,
        "dropped": dropped,
        "bytes_up": statistics.mean(trace.bytes_up[i] for i in stayed),
        "bytes_down": statistics.mean(trace.bytes_down[i] for i in stayed),
        "client_cpu_s": statistics.mean(trace.client_cpu[i] for i in stayed),
        "client_cpu_max_s": max(trace.client_cpu[i] for i in stayed),
        "server_cpu_s": trace.server_cpu,
        "in_process_wall_s": wall,
        "max_abs_error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", default="10,50,100", help="comma-separated devices per round")
    parser.add_argument("--samples", type=int, default=600, help="local samples per device (its weight)")
    parser.add_argument("--http-cohorts", default="10,50,100", help="devices per real HTTP round ('' for none)")
    parser.add_argument("--workers", type=int, default=4, help="device worker processes for the fleet rounds")
    parser.add_argument(
        "--fleet-cohorts",
        default="10,50,100",
        help="devices per round with devices in --workers processes ('' for none)",
    )
    parser.add_argument(
        "--e2e-cohorts", default="10,50,100", help="devices per end-to-end round (local training included; '' for none)"
    )
    parser.add_argument("--json", action="store_true", help="print only the final JSON line")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    delta_tensors, train_cpu = train_once(args.samples)
    delta = flatten(delta_tensors).astype(np.float32)
    model_bytes = len(build_model_bytes("lenet", seed=0))
    say(f"LeNet delta: {delta.size} parameters; one local epoch on {args.samples} samples: {train_cpu:.2f} CPU-s")
    rows = []
    for n in [int(c) for c in args.cohorts.split(",") if c]:
        plain = plain_round(delta_tensors, n, args.samples)
        for dropped in (0, n // 3):
            sa = secagg_round(delta, n, args.samples, dropped, seed=n + dropped)
            row = {
                "devices": n,
                **{k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in sa.items()},
                "plain_bytes_up": plain["bytes_up"],
                "plain_client_cpu_s": round(plain["client_cpu_s"], 4),
                "plain_server_cpu_s": round(plain["server_cpu_s"], 4),
                "upload_ratio": round(sa["bytes_up"] / plain["bytes_up"], 3),
                # both rounds also download the model file
                "total_bytes_ratio": round(
                    (sa["bytes_up"] + sa["bytes_down"] + model_bytes) / (plain["bytes_up"] + model_bytes), 3
                ),
                # device CPU of a whole round (training included), secure over plain
                "device_cpu_ratio": round((train_cpu + sa["client_cpu_s"]) / (train_cpu + plain["client_cpu_s"]), 3),
            }
            rows.append(row)
            say(
                f"n={n:4d} k={row['neighbours']:3d} t={row['threshold']:3d} dropped={dropped:3d}: "
                f"up {row['bytes_up'] / 1e3:.1f} kB (plain {plain['bytes_up'] / 1e3:.1f}), "
                f"down {row['bytes_down'] / 1e3:.1f} kB + model {model_bytes / 1e3:.1f} kB, "
                f"device {row['client_cpu_s'] * 1e3:.1f} ms (plain {plain['client_cpu_s'] * 1e3:.1f}), "
                f"server {row['server_cpu_s']:.2f} s (plain {plain['server_cpu_s']:.2f}), "
                f"total bytes x{row['total_bytes_ratio']}, device CPU x{row['device_cpu_ratio']}"
            )
    http_rows = http_table(args.http_cohorts, delta_tensors, args.samples, model_bytes, say, "one process")
    fleet_rows = http_table(
        args.fleet_cohorts, delta_tensors, args.samples, model_bytes, say, f"{args.workers} workers", args.workers
    )
    e2e_rows = http_table(
        args.e2e_cohorts,
        delta_tensors,
        args.samples,
        model_bytes,
        say,
        f"{args.workers} workers, training",
        args.workers,
        True,
    )
    result = {
        "bench": "secagg",
        "parameters": int(delta.size),
        "model_download_bytes": model_bytes,
        "train_epoch_cpu_s": round(train_cpu, 3),
        "prg_mb_per_s": round(prg_throughput(delta.size + 1), 1),
        "shamir_reconstruct_ms": {
            "t=35,k=68": round(shamir_ms(35, 68), 2),
            "t=119,k=236": round(shamir_ms(119, 236), 2),
        },
        "rounds": rows,
        "http_rounds": http_rows,
        "fleet_rounds": fleet_rows,
        "end_to_end_rounds": e2e_rows,
        "workers": args.workers,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


def http_table(cohorts: str, delta_tensors, samples: int, model_bytes: int, say, label: str, workers=0, train=False):
    """Plain and secure rounds over HTTP for each cohort size, alternating (plain, secure), with ratios."""
    http_rows = []
    for n in [int(c) for c in cohorts.split(",") if c]:
        load = os.getloadavg()[0]
        plain = http_round(n, delta_tensors, samples, secure=False, workers=workers, train=train)
        secure = http_round(n, delta_tensors, samples, secure=True, workers=workers, train=train)
        row = {"devices": n, "load_average_1m": round((load + os.getloadavg()[0]) / 2, 1)}
        for key in plain:
            row[f"plain_{key}"] = float(f"{plain[key]:.4g}")
            row[f"secagg_{key}"] = float(f"{secure[key]:.4g}")
        row["bytes_ratio"] = round(
            (secure["bytes_up"] + secure["bytes_down"]) / (plain["bytes_up"] + plain["bytes_down"]), 3
        )
        row["bytes_ratio_with_model"] = round(
            (secure["bytes_up"] + secure["bytes_down"] + model_bytes)
            / (plain["bytes_up"] + plain["bytes_down"] + model_bytes),
            3,
        )
        row["round_time_ratio"] = round(secure["round_wall_s"] / plain["round_wall_s"], 3)
        http_rows.append(row)
        say(
            f"HTTP ({label}) n={n:4d}: up {secure['bytes_up'] / 1e3:.1f} kB (plain {plain['bytes_up'] / 1e3:.1f}), "
            f"down {secure['bytes_down'] / 1e3:.1f} kB (plain {plain['bytes_down'] / 1e3:.1f}), "
            f"device {secure['device_cpu_s']:.3f} CPU-s (plain {plain['device_cpu_s']:.3f}), "
            f"coordinator {secure['coordinator_cpu_s']:.2f} CPU-s (plain {plain['coordinator_cpu_s']:.2f}), "
            f"round {secure['round_wall_s']:.2f} s (plain {plain['round_wall_s']:.2f})"
        )
    return http_rows


if __name__ == "__main__":
    main()

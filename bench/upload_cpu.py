"""Where a coordinator's CPU per LeNet upload goes, piece by piece, in-process (issue 15, item 3).

    python bench/upload_cpu.py --json

CPU milliseconds (process time, median of repeats) of each step the upload route runs on a real
LeNet-sized float32 update: hashing the body (sha256), parsing the container (its checksum
included), decoding and validating the update, the strategy's accept and the running sum, and
serializing the running aggregate as the group-commit writer stores it. `bench/load.py` reports
the whole, HTTP and database included (`coordinator_cpu_ms_per_upload`, from a phase of uploads
alone), and with `--py-spy FILE` its split (`upload_cpu_ms_split`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from coordinator.service.validation import check_update  # noqa: E402
from coordinator.strategies import RunningSum, make_strategy  # noqa: E402
from engine.models.lenet import lenet_weights  # noqa: E402
from engine.serialize.container import loads  # noqa: E402
from protocol.update import decode_update, encode_update  # noqa: E402


def cpu_ms(step, repeats: int) -> float:
    step()
    samples = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(repeats):
            step()
        samples.append(1000 * (time.process_time() - started) / repeats)
    return round(statistics.median(samples), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--encoding", default="float32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shapes = {k: v.shape for k, v in lenet_weights(0).items()}
    rng = np.random.default_rng(0)
    delta = {k: (0.01 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
    body = encode_update(delta, sample_count=480, round_id=1, base_version=0, encoding=args.encoding)
    update = decode_update(body, expected=shapes)
    strategy, running = make_strategy({"strategy": "fedavg"}), RunningSum()
    running.add(update.delta, 480)
    steps = {
        "sha256_body": lambda: hashlib.sha256(body).digest(),
        "container_parse": lambda: loads(body, kind="update"),
        "decode_update": lambda: decode_update(body, expected=shapes),
        "check_update": lambda: check_update(
            body, round_id=1, base_version=0, expected=shapes, max_norm=1e9, max_sample_count=10**9
        ),
        "accept_and_add": lambda: running.add(*strategy.accept(update.delta, 480)),
        "aggregate_to_bytes": lambda: running.to_bytes(),
    }
    result = {name: cpu_ms(step, args.repeats) for name, step in steps.items()}
    result.update(body_bytes=len(body), encoding=args.encoding, unit="CPU ms per upload")
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Footprint of one device round: peak RSS and CPU-seconds of the agent doing one local LeNet
round on 600 samples (download from cache, train, delta, encode, persist, upload, personalize).

The coordinator is replaced by an in-process httpx.MockTransport, so the numbers are the
agent's own work, with the real code path (client, state dir, encoding) and no network.

    python bench/agent_round.py --json     # last line: one JSON object
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from device_agent.client import CoordinatorClient  # noqa: E402
from device_agent.eligibility import AlwaysEligible  # noqa: E402
from device_agent.runner import Agent, AgentConfig  # noqa: E402
from device_agent.state import AgentState  # noqa: E402
from engine.data import ArrayDataset, load_default  # noqa: E402
from engine.models import build_model_bytes  # noqa: E402


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fake_coordinator(model: bytes, task: dict) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/devices":
            return httpx.Response(201, json={"device_id": "bench", "token": "t"})
        if path == "/v1/checkin":
            return httpx.Response(200, json={"status": "task", "task": task})
        if path.startswith("/v1/models/"):
            return httpx.Response(200, content=model, headers={"ETag": f'"{hashlib.sha256(model).hexdigest()}"'})
        if path.endswith("/updates"):
            return httpx.Response(202, json={"accepted": True, "round_id": 1, "received": 1, "goal": 1})
        return httpx.Response(404, json={"detail": path})

    return httpx.MockTransport(handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=600, help="local training samples")
    parser.add_argument("--holdout", type=float, default=0.2, help="extra held-out share for evaluation")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoding", default="int8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    train = load_default("train")
    total = round(args.samples / (1 - args.holdout))  # so that exactly --samples remain for training
    x, y = train.get_batch(np.arange(total))
    dataset = ArrayDataset(x.astype(np.float32), y)
    model = build_model_bytes("lenet", seed=0)
    task = {
        "round_id": 1,
        "base_version": 0,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": 0.05,
        "momentum": 0.9,
        "deadline": time.time() + 3600,
        "fedprox_mu": 0.0,
        "clip_norm": None,
        "noise_multiplier": 0.0,
        "encoding": args.encoding,
        "topk_fraction": None,
    }
    rss_before = rss_mib()
    with tempfile.TemporaryDirectory() as state_dir:
        client = CoordinatorClient("http://bench", transport=fake_coordinator(model, task))
        config = AgentConfig(coordinator="http://bench", enrollment_key="k", once=True, holdout=args.holdout)
        agent = Agent(config, client, AgentState(state_dir), dataset, AlwaysEligible(), emit=lambda s: None)
        wall, cpu = time.perf_counter(), time.process_time()
        [record] = agent.run()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    result = {
        "bench": "agent_round",
        "samples": args.samples,
        "train_samples": record["samples"],
        "epochs": args.epochs,
        "encoding": args.encoding,
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "peak_rss_mib": round(rss_mib(), 1),
        "rss_before_round_mib": round(rss_before, 1),
        "bytes_sent": record["bytes_sent"],
        "bytes_raw_float32": record["bytes_raw_float32"],
        "acc_before": record["acc_before"],
        "acc_after": record["acc_after"],
        "personal_acc": record.get("personal_acc"),
        "global_acc": record.get("global_acc"),
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:>22}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""One LeNet training step (forward, backward, SGD momentum) in the engine and in PyTorch CPU.

Same model, same initial weights, same batch, same thread count, same process: the two
steps are interleaved (engine, torch, engine, torch, ...) so machine noise hits both, and
each side's median over many steps after warm-up is reported. Peak memory is measured in a
fresh child process per side (peak RSS during steps minus RSS once model and optimizer exist).

    python bench/engine_step.py --batch 64 --json          # last line: one JSON object
    python bench/engine_step.py --batch 8 --profile        # plus where the engine's step goes
    python bench/engine_step.py --batch 64 --passes none   # the compiler's passes off (or a list)

torch is a benchmark reference only; the engine never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine import grad, opr  # noqa: E402
from engine.loss import CrossEntropyLoss  # noqa: E402
from engine.models.lenet import build_lenet  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.runtime import CompiledFunction  # noqa: E402

LR, MOMENTUM = 0.01, 0.9


def blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info

        counts = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
        if counts:
            return counts[0]
    except ImportError:
        pass
    return int(os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count() or 1))


def make_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch)


def engine_step(batch: int, passes: list[str] | None):
    """The seed's training function: loss and SGD-momentum updates attached, compiled once."""
    model = build_lenet(seed=0)
    graph = model.graph
    label = opr.host2device(graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    weights = list(model.params.values())
    updates = SGD(LR, momentum=MOMENTUM).make_multiple(weights, grad(loss, weights), graph)
    func = graph.compile([loss, model.output], updates=updates, passes=passes)
    x, y = make_batch(batch)
    feeds = {"x": x, "label": y}
    return (lambda: func.execute(feeds)), func


def torch_step(batch: int):
    import torch
    from torch import nn

    weights = {k: torch.from_numpy(v.copy()) for k, v in build_lenet(seed=0).state_dict().items()}
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )
    with torch.no_grad():
        for i, name in ((0, "conv1"), (3, "conv2")):
            net[i].weight.copy_(weights[f"{name}.weight"])
            net[i].bias.copy_(weights[f"{name}.bias"].reshape(-1))
        for i, name in ((7, "fc1"), (9, "fc2"), (11, "fc3")):
            net[i].weight.copy_(weights[f"{name}.weight"].T)  # ours is (in, out)
            net[i].bias.copy_(weights[f"{name}.bias"])
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss_fn = nn.CrossEntropyLoss()
    x, y = make_batch(batch)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xt), yt)
        loss.backward()
        opt.step()
        return loss

    return step


def step_flops(func: CompiledFunction) -> int:
    """Multiply-adds x2 of the convolutions and matrix products one step runs (shapes from the plan)."""
    shape = {id(n): func.last_shapes.get(i) for i, n in enumerate(func.program.nodes)}
    total = 0
    for node in func.program.nodes:
        kind = node.op.type_name
        if kind == "MatrixMul":
            a = shape[id(node.inputs[0])]
            out = shape[id(node)]
            total += 2 * out[0] * out[1] * (a[0] if node.op.transpose_a else a[1])
        elif kind in ("Convolution", "ConvolutionBackwardData", "ConvolutionBackwardFilter"):
            w = shape[id(node.inputs[1 if kind == "Convolution" else (0 if kind.endswith("Data") else 2)])]
            dout = shape[id(node)] if kind == "Convolution" else shape[id(node.inputs[1])]
            total += 2 * int(np.prod(dout)) * int(np.prod(w[1:]))
    return total


def peak_mb(side: str, batch: int, steps: int, threads: int | None) -> float:
    """Run in a child: peak RSS during `steps` steps above the RSS before the first step."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--batch",
            str(batch),
            "--_peak",
            side,
            "--steps",
            str(steps),
            *(["--threads", str(threads)] if threads else []),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak(side: str, batch: int, steps: int, passes: list[str] | None) -> None:
    step = engine_step(batch, passes)[0] if side == "engine" else torch_step(batch)
    base = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step()
    print((_rss_kb("VmHWM") - base) / 1024)


def profile_table(func: CompiledFunction, step, steps: int) -> str:
    func.op_seconds.clear()
    func.op_calls.clear()
    func.profiled_steps = 0
    func.profile = True
    for _ in range(steps):
        step()
    func.profile = False
    return func.profile_report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--passes", default=None, help="'none' or comma-separated compiler passes (default: all)")
    parser.add_argument("--profile", action="store_true", help="print the engine's per-operator profile")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS and torch threads (default: numpy's BLAS setting; needs threadpoolctl)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--_peak", choices=["engine", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    passes = None if args.passes is None else ([] if args.passes == "none" else args.passes.split(","))

    if args.threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads, user_api="blas")
    if args._peak:
        _measure_peak(args._peak, args.batch, min(args.steps, 30), passes)
        return 0

    import torch

    threads = blas_threads()
    torch.set_num_threads(threads)
    run_engine, func = engine_step(args.batch, passes)
    run_torch = torch_step(args.batch)
    for _ in range(args.warmup):
        run_engine()
        run_torch()
    engine_s, torch_s = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        run_engine()
        mid = time.perf_counter()
        run_torch()
        engine_s.append(mid - start)
        torch_s.append(time.perf_counter() - mid)
    engine_ms, torch_ms = float(np.median(engine_s) * 1e3), float(np.median(torch_s) * 1e3)
    flops = step_flops(func)
    print(
        f"threads: numpy BLAS {threads}, torch {torch.get_num_threads()}; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )
    print(func.explain())
    if args.profile:
        print(profile_table(func, run_engine, max(args.steps // 2, 20)))
    result = {
        "batch": args.batch,
        "engine_ms": round(engine_ms, 3),
        "torch_ms": round(torch_ms, 3),
        "ratio": round(engine_ms / torch_ms, 3),
        "engine_peak_mb": round(peak_mb("engine", args.batch, args.steps, args.threads), 2),
        "torch_peak_mb": round(peak_mb("torch", args.batch, args.steps, args.threads), 2),
        "gflops": round(flops / (engine_ms / 1e3) / 1e9, 2),
    }
    if not args.json:
        print(f"engine {engine_ms:.3f} ms, torch {torch_ms:.3f} ms per step")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One LeNet training step (forward, backward, SGD momentum) in the engine and in PyTorch CPU.

Same model (the padded LeNet), same initial weights, same real Fashion-MNIST batches, same
machine: each side runs at 1 thread and at 2 threads, in fresh child processes whose thread
pools are sized through the environment at start (OPENBLAS/OMP/MKL_NUM_THREADS and
torch.set_num_threads). In a child the steps are interleaved (engine, torch, engine, ...); the
children rotate through the thread counts several times, so machine noise hits every
configuration alike. Reported per batch size: each side's median step at each thread
count, each side's best of those, and `ratio` = engine best / torch best. Peak memory is
measured in a fresh child process per side (peak RSS during steps minus RSS once model and
optimizer exist).

    python bench/engine_step.py --json                      # batches 64, 8, 1; last line: one JSON object
    python bench/engine_step.py --batch 8 --profile         # plus where the engine's step goes
    python bench/engine_step.py --batch 64 --passes none    # the compiler's passes off (or a list)

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
from engine.data import DataLoader, MnistDataset, embedded_dir  # noqa: E402
from engine.loss import CrossEntropyLoss  # noqa: E402
from engine.models.lenet import build_lenet  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.runtime import CompiledFunction  # noqa: E402

LR, MOMENTUM = 0.01, 0.9
FULL_DATA = Path("/usr/share/datasets/fashion-mnist")
N_BATCHES = 16  # distinct real batches, cycled through by both sides in the same order


THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child(args_: list[str], threads: int) -> str:
    """Run this script in a fresh process whose BLAS and torch pools have `threads` threads from the
    start (set through the environment: nothing switches pools mid-run, no idle pool spins)."""
    env = {**os.environ, **{k: str(threads) for k in THREAD_ENV}, "PF_BENCH_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, *args_], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child {args_} failed:\n{out.stderr}")
    return out.stdout


def real_batches(data_dir: Path, batch: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`N_BATCHES` shuffled Fashion-MNIST training batches, normalized as pf-train feeds them."""
    loader = DataLoader(MnistDataset(data_dir, split="train"), batch_size=batch, shuffle=True, seed=seed)
    return [loader.next() for _ in range(N_BATCHES)]


def make_batch(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A random batch, for callers without data (bench/training_step_onnx.py's torch side)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch)


def engine_step(batch: int, passes: list[str] | None, batches):
    """The seed's training function: loss and SGD-momentum updates attached, compiled once."""
    model = build_lenet(seed=0)
    graph = model.graph
    label = opr.host2device(graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    weights = list(model.params.values())
    updates = SGD(LR, momentum=MOMENTUM).make_multiple(weights, grad(loss, weights), graph)
    func = graph.compile([loss, model.output], updates=updates, passes=passes)
    feeds = [{"x": x, "label": y} for x, y in batches]
    count = iter(range(1 << 62))
    return (lambda: func.execute(feeds[next(count) % len(feeds)])), func


def torch_step(batch: int, batches=None):
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
    tensors = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in (batches or [make_batch(batch)])]
    count = iter(range(1 << 62))

    def step():
        xt, yt = tensors[next(count) % len(tensors)]
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
        elif kind in ("ConvolutionFromCols", "FilterGradFromCols"):
            cols = shape[id(node.inputs[0])]  # (N, G, K, P): every output value is a K-long dot product
            out = shape[id(node)] if kind == "ConvolutionFromCols" else shape[id(node.inputs[1])]
            total += 2 * int(np.prod(out)) * cols[2]
    return total


def peak_mb(side: str, batch: int, steps: int, data: Path) -> float:
    """Run in a child at 1 thread: peak RSS during `steps` steps above the RSS before the first step."""
    return float(
        child(["--batch", str(batch), "--_peak", side, "--steps", str(steps), "--data", str(data)], 1).split()[-1]
    )


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak(side: str, batch: int, steps: int, passes: list[str] | None, data: Path) -> None:
    batches = real_batches(data, batch)
    step = engine_step(batch, passes, batches)[0] if side == "engine" else torch_step(batch, batches)
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


def _block(batch: int, steps: int, args, passes: list[str] | None) -> None:
    """In a child: `steps` interleaved steps per side after warm-up; prints their times (and more)."""
    import torch

    torch.set_num_threads(int(os.environ["PF_BENCH_THREADS"]))
    batches = real_batches(args.data, batch)
    run_engine, func = engine_step(batch, passes, batches)
    run_torch = torch_step(batch, batches)
    for _ in range(args.warmup):
        run_engine()
        run_torch()
    engine_s, torch_s, engine_cpu, torch_cpu = [], [], [], []
    pairs = [("engine", run_engine, engine_s, engine_cpu), ("torch", run_torch, torch_s, torch_cpu)]
    deadline = time.perf_counter() + args.block_seconds
    for k in range(steps):
        if k >= 5 and time.perf_counter() > deadline:  # a thrashing configuration: enough seen
            break
        # alternate who goes first: with a fixed order, the second side of a pair that outlasts
        # the scheduler's time slice would be the one preempted, step after step
        for _, run, wall, cpu in pairs if k % 2 == 0 else pairs[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    if args.profile:
        print(func.explain())
        print(f"engine profile at {os.environ['PF_BENCH_THREADS']} thread(s):")
        print(profile_table(func, run_engine, max(steps // 2, 20)))
    found = {"engine": engine_s, "torch": torch_s, "engine_cpu": engine_cpu, "torch_cpu": torch_cpu}
    print(json.dumps({**found, "flops": step_flops(func), "explain": func.explain()}))


def measure(batch: int, args, passes: list[str] | None) -> dict:
    """Medians per side and thread count over `--repeats` child processes per thread count, rotating."""
    sides = ("engine", "torch", "engine_cpu", "torch_cpu")
    times: dict[tuple[str, int], list[float]] = {(s, t): [] for s in sides for t in args.threads}
    per_block = max(args.steps // args.repeats, 1)
    common = ["--data", str(args.data), "--warmup", str(args.warmup), "--block-seconds", str(args.block_seconds)]
    common += [] if args.passes is None else ["--passes", args.passes]
    for _ in range(args.repeats):
        for t in args.threads:
            out = json.loads(child(["--_block", str(batch), "--steps", str(per_block), *common], t).splitlines()[-1])
            for side in sides:
                times[side, t] += out[side]
    ms = {key: float(np.median(v) * 1e3) for key, v in times.items()}
    result: dict = {"batch": batch}
    for side in ("engine", "torch"):
        for t in args.threads:
            result[f"{side}_ms_{t}t"] = round(ms[side, t], 3)
        best = min(args.threads, key=lambda t, side=side: ms[side, t])
        result[f"{side}_ms"] = round(ms[side, best], 3)
        result[f"{side}_threads"] = best
    result["ratio"] = round(ms["engine", result["engine_threads"]] / ms["torch", result["torch_threads"]], 3)
    result["ratio_1t"] = round(ms["engine", args.threads[0]] / ms["torch", args.threads[0]], 3)
    # CPU time per step (all the process's threads, so idle BLAS/OpenMP threads spinning count
    # too): what a step costs whatever else the machine runs; the ratio is taken at 1 thread
    for side in ("engine", "torch"):
        for t in args.threads:
            result[f"{side}_cpu_ms_{t}t"] = round(ms[f"{side}_cpu", t], 3)
    first = args.threads[0]
    result[f"ratio_cpu_{first}t"] = round(ms["engine_cpu", first] / ms["torch_cpu", first], 3)
    if not args.no_peak:
        result["engine_peak_mb"] = round(peak_mb("engine", batch, min(args.steps, 30), args.data), 2)
        result["torch_peak_mb"] = round(peak_mb("torch", batch, min(args.steps, 30), args.data), 2)
    result["gflops"] = round(out["flops"] / (result["engine_ms"] / 1e3) / 1e9, 2)
    print(out["explain"])
    if args.profile:
        profile_args = ["--_block", str(batch), "--steps", str(per_block), "--profile", *common]
        print(child(profile_args, result["engine_threads"]).rsplit("\n", 2)[0])
    cells = ", ".join(f"{t} thread(s) {ms['engine', t]:.3f} / {ms['torch', t]:.3f}" for t in args.threads)
    print(f"batch {batch}: engine / torch ms per step at {cells}; ratio of bests {result['ratio']:.3f}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="64,8,1", help="batch size(s), comma-separated")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per side and thread count")
    parser.add_argument("--repeats", type=int, default=4, help="rotations through the thread counts")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per side before each block")
    parser.add_argument("--block-seconds", type=float, default=4.0, help="cut a block short (after 5 steps) past this")
    parser.add_argument("--threads", default="1,2", help="thread counts to try on both sides")
    parser.add_argument(
        "--data",
        type=Path,
        default=FULL_DATA if FULL_DATA.is_dir() else embedded_dir(),
        help="Fashion-MNIST IDX directory (default: the full set if installed, else the embedded subset)",
    )
    parser.add_argument("--passes", default=None, help="'none' or comma-separated compiler passes (default: all)")
    parser.add_argument("--profile", action="store_true", help="print the engine's per-operator profile")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--_peak", choices=["engine", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--_block", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    passes = None if args.passes is None else ([] if args.passes == "none" else args.passes.split(","))
    args.threads = [int(t) for t in args.threads.split(",")]
    sizes = [int(b) for b in args.batch.split(",")]
    if args._peak:
        _measure_peak(args._peak, sizes[0], args.steps, passes, args.data)
        return 0
    if args._block:
        _block(args._block, args.steps, args, passes)
        return 0
    print(f"data: {args.data}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    results = [measure(b, args, passes) for b in sizes]
    print(json.dumps({"data": str(args.data), "threads": args.threads, "batches": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

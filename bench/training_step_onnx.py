"""The ONNX training step: file size against the inference model, steps per second in onnxruntime
(Python, CPU EP) against the engine and PyTorch CPU on the same LeNet, at several batch sizes.

Each side runs with one thread (onnxruntime intra/inter-op threads, the engine's BLAS through
threadpoolctl, torch.set_num_threads) in one process; steps are interleaved (engine, onnxruntime,
torch, engine, ...) so machine noise hits all three, and medians after warm-up are reported. The
onnxruntime step is what a device runs: weights and optimizer state fed in, the new ones fed back.

    python bench/training_step_onnx.py --json                   # last line: one JSON object
    python bench/training_step_onnx.py --batches 32 --optimizer adam --threads 2

torch is a benchmark reference only; the engine never imports it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from engine.data import load_default  # noqa: E402
from engine.models import build  # noqa: E402
from engine.onnx import export_onnx, export_training_step  # noqa: E402
from engine.optimizer import OPTIMIZERS, make_optimizer  # noqa: E402
from engine.serialize.modelfile import dumps  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

LR = {"sgd": 0.05, "sgd-momentum": 0.05, "adam": 1e-3}


def sizes(optimizer: str) -> dict[str, int]:
    model = build("lenet", seed=0)
    return {
        "step_bytes": len(export_training_step(model, optimizer=optimizer, lr=LR[optimizer])),
        "step_with_initial_values_bytes": len(
            export_training_step(model, optimizer=optimizer, lr=LR[optimizer], initial_values=True)
        ),
        "inference_onnx_bytes": len(export_onnx(model)),
        "model_file_bytes": len(dumps(model)),
    }


class OnnxSteps:
    """The device's loop: run, then feed every new/<name> and new_state/<name> back."""

    def __init__(self, data: bytes, weights: dict[str, np.ndarray], lr: float, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        start = time.perf_counter()
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.load_ms = (time.perf_counter() - start) * 1000
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.state = {}
        for i in self.session.get_inputs():
            if i.name in weights:
                self.state[i.name] = weights[i.name].copy()
            elif i.name.startswith("state/"):
                self.state[i.name] = np.zeros([d for d in i.shape], np.float32)
        self.feed_back = {o: o.replace("new_", "", 1) if o.startswith("new_") else o[4:] for o in self.outputs[1:]}
        self.lr = np.asarray(lr, np.float32)

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        results = self.session.run(None, {"x": x, "label": y, "lr": self.lr, **self.state})
        for name, value in zip(self.outputs[1:], results[1:]):
            self.state[self.feed_back[name]] = value
        return float(results[0])


def torch_steps(optimizer: str, batch: int):
    from engine_step import torch_step

    step = torch_step(batch)  # the seed's LeNet with the same weights, SGD momentum
    return step if optimizer == "sgd-momentum" else None


def measure(optimizer: str, batch: int, steps: int, warmup: int, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    model = build("lenet", seed=0)
    data = export_training_step(model, optimizer=optimizer, lr=LR[optimizer])
    onnx_side = OnnxSteps(data, model.state_dict(), LR[optimizer], threads)
    trainer = Trainer(model, optimizer=make_optimizer(optimizer, LR[optimizer]), batch_size=batch)
    x, y = load_default("train").get_batch(np.arange(batch))
    torch_step = torch_steps(optimizer, batch)
    first = abs(onnx_side.step(x, y) - trainer.step(x, y)[0])
    sides = {"engine": lambda: trainer.step(x, y), "onnxruntime": lambda: onnx_side.step(x, y)}
    if torch_step is not None:
        sides["torch"] = torch_step
    times: dict[str, list[float]] = {name: [] for name in sides}
    for k in range(warmup + steps):
        for name, run in sides.items():
            start = time.perf_counter()
            run()
            if k >= warmup:
                times[name].append(time.perf_counter() - start)
    result = {"batch": batch, "first_step_loss_difference": first, "onnx_session_load_ms": round(onnx_side.load_ms, 1)}
    for name, values in times.items():
        ms = statistics.median(values) * 1000
        result[f"{name}_ms"] = round(ms, 3)
        result[f"{name}_steps_per_s"] = round(1000 / ms, 1)
    result["onnx_vs_engine"] = round(result["engine_ms"] / result["onnxruntime_ms"], 3)  # > 1: onnxruntime faster
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd-momentum")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per side and batch size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="threads per side (default: 1)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads, user_api="blas")
    size = sizes(args.optimizer)
    print(
        f"LeNet, {args.optimizer}: training step {size['step_bytes']:,} B "
        f"({size['step_with_initial_values_bytes']:,} B with initial values) vs inference ONNX "
        f"{size['inference_onnx_bytes']:,} B, pocketfed model file {size['model_file_bytes']:,} B"
    )
    runs = []
    for batch in [int(b) for b in args.batches.split(",")]:
        run = measure(args.optimizer, batch, args.steps, args.warmup, args.threads)
        runs.append(run)
        torch_part = f", torch {run['torch_ms']:.2f} ms" if "torch_ms" in run else ""
        print(
            f"batch {batch:3d}: engine {run['engine_ms']:.2f} ms, onnxruntime {run['onnxruntime_ms']:.2f} ms "
            f"({run['onnxruntime_steps_per_s']:.0f} steps/s, {run['onnx_vs_engine']:.2f}x the engine's speed)"
            f"{torch_part}; session load {run['onnx_session_load_ms']:.0f} ms"
        )
    summary = {"model": "lenet", "optimizer": args.optimizer, "threads": args.threads, **size, "runs": runs}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training step on a phone's runtime: steps per second in onnxruntime-node (the TypeScript
agent's StepTrainer) against onnxruntime-python and the engine, the step file's size against the
inference model, and the TypeScript agent's peak memory for a 600-sample round (the Python agent's
beside it).

Speed: one thread per side (onnxruntime intra-op threads, the engine's BLAS via threadpoolctl).
The engine and onnxruntime-python steps are interleaved in this process; onnxruntime-node runs in
its own node process over the same batches (device_agent/js/dist/bench/stepSpeed.js), so its
medians are taken at a different moment. Memory: one real round against an in-process
coordinator, each agent a child process whose peak RSS (ru_maxrss) is read when it exits.

    python bench/training_step_node.py --json                         # last line: one JSON object
    python bench/training_step_node.py --models lenet,vit,mobilenetv2,gru --batches 32

Needs Node.js with device_agent/js installed (npm ci --ignore-scripts); the families need torch.
"""

from __future__ import annotations

import argparse
import json
import resource  # noqa: F401  (used by the memory wrapper's child, imported here to fail early off POSIX)
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from training_step_onnx import OnnxSteps  # noqa: E402

from engine.data import load_default  # noqa: E402
from engine.models import build  # noqa: E402
from engine.onnx import export_onnx, export_training_step, import_onnx  # noqa: E402
from engine.optimizer import make_optimizer  # noqa: E402
from engine.serialize.modelfile import dumps, loads  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from simulation.js_agents import JS_DIR, prepare  # noqa: E402

LR = {"sgd": 0.05, "sgd-momentum": 0.05, "adam": 1e-3}
SPEED_JS = JS_DIR / "dist" / "bench" / "stepSpeed.js"
MEMORY_WRAPPER = (  # run argv[1:], print the child's peak RSS in KiB (Linux ru_maxrss)
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.stderr.write(done.stderr[-2000:] if done.returncode else '')"
)


def family(name: str, folder: Path):
    """A model: the engine's LeNet, or a family of tests/torch_families.py at its default size, exported
    by PyTorch and imported as a user would."""
    if name == "lenet":
        return build("lenet", seed=0)
    import torch
    from torch_families import FAMILIES, export

    torch.manual_seed(0)
    cls, shape = FAMILIES[name]
    export(cls(), shape, folder / f"{name}.onnx")
    return import_onnx(folder / f"{name}.onnx")


def batches(model, batch: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` batches of real images as the model's input (already preprocessed)."""
    x, y = load_default("train").get_batch(np.arange(batch * count))
    return x.reshape(len(x), *model.input.shape[1:]).astype(np.float32), y.astype(np.int64)


def measure(name: str, model, optimizer: str, batch: int, steps: int, warmup: int, node: str, folder: Path) -> dict:
    lr = LR[optimizer]
    model = loads(dumps(model))  # a Trainer adds its graph to the model: each run trains a fresh copy
    step = export_training_step(model, optimizer=optimizer, lr=lr)
    (folder / "model.pfm").write_bytes(dumps(model))
    (folder / "step.onnx").write_bytes(step)
    x, y = batches(model, batch, warmup + steps)
    np.savez(folder / "data.npz", x=x, y=y)
    onnx_side = OnnxSteps(step, model.state_dict(), lr, 1)
    trainer = Trainer(model, optimizer=make_optimizer(optimizer, lr), batch_size=batch)
    times: dict[str, list[float]] = {"engine": [], "onnxruntime_python": []}
    for k in range(warmup + steps):
        xb, yb = x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
        for side, run in (
            ("engine", lambda xb=xb, yb=yb: trainer.step(xb, yb)),
            ("onnxruntime_python", lambda xb=xb, yb=yb: onnx_side.step(xb, yb)),
        ):
            start = time.perf_counter()
            run()
            if k >= warmup:
                times[side].append(time.perf_counter() - start)
    command = [node, str(SPEED_JS), *(str(folder / n) for n in ("model.pfm", "step.onnx", "data.npz"))]
    done = subprocess.run(
        [*command, str(batch), str(warmup), str(lr), "1"], capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise SystemExit(f"stepSpeed.js failed: {done.stderr[-2000:]}")
    node_run = json.loads(done.stdout.strip().splitlines()[-1])
    result = {"model": name, "batch": batch}
    for side, values in times.items():
        result[f"{side}_ms"] = round(statistics.median(values) * 1000, 3)
    result["onnxruntime_node_ms"] = round(node_run["ms"], 3)
    for side in ("engine", "onnxruntime_python", "onnxruntime_node"):
        result[f"{side}_steps_per_s"] = round(1000 / result[f"{side}_ms"], 1)
    result["node_session_load_ms"] = round(node_run["load_ms"], 1)
    result["python_session_load_ms"] = round(onnx_side.load_ms, 1)
    return result


def sizes(name: str, model, optimizer: str) -> dict:
    """The served step holds no weights (the device feeds the model file's); with initial_values it
    carries them and zero optimizer state, like the inference file carries the weights."""
    step = export_training_step(model, optimizer=optimizer, lr=LR[optimizer])
    inference = export_onnx(model)
    full = export_training_step(model, optimizer=optimizer, lr=LR[optimizer], initial_values=True)
    return {
        "model": name,
        "step_bytes": len(step),
        "step_with_initial_values_bytes": len(full),
        "inference_onnx_bytes": len(inference),
        "model_file_bytes": len(dumps(model)),
        "step_vs_inference": round(len(step) / len(inference), 3),
    }


def peak_memory(node: str, samples: int, folder: Path) -> dict:
    """One 600-sample round (LeNet, 1 epoch, batch 32, SGD momentum) per agent against a real coordinator."""
    import httpx

    from coordinator.api import create_app
    from coordinator.settings import Settings
    from coordinator.testing import ServerThread

    data = load_default("train")
    pixels, labels = data.raw[:samples][:, None], np.asarray(data.labels[:samples], np.int64)
    np.savez(folder / "local.npz", x=pixels, y=labels)
    (folder / "lenet.pfm").write_bytes(dumps(build("lenet", seed=0)))
    out = {}
    for agent in ("js", "python"):
        settings = Settings(
            db=str(folder / f"{agent}.db"), model=str(folder / "lenet.pfm"), goal=1, min_devices=1, min_fraction=1.0,
            enrollment_key="k", momentum=0.9, lr=0.05, batch_size=32, epochs=1,
        )  # fmt: skip
        with ServerThread(create_app(settings)) as server:
            common = ["--coordinator", server.url, "--enrollment-key", "k", "--data", str(folder / "local.npz")]
            common += ["--state-dir", str(folder / f"{agent}-state"), "--once", "--json"]
            if agent == "js":
                cmd = [node, str(JS_DIR / "dist" / "cli.js"), "run", *common]
            else:
                cmd = [sys.executable, "-m", "device_agent", "run", *common, "--ignore-conditions", "--holdout", "0"]
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", MEMORY_WRAPPER, *cmd], capture_output=True, text=True)
            seconds = time.perf_counter() - started
            code, kib = (int(v) for v in done.stdout.split()[-2:])
            if code != 0:
                raise SystemExit(f"the {agent} agent failed: {done.stderr}")
            received = httpx.get(f"{server.url}/v1/rounds/1", timeout=10).json()
            out[f"{agent}_agent_peak_rss_mib"] = round(kib / 1024, 1)
            out[f"{agent}_agent_round_s"] = round(seconds, 2)
            out[f"{agent}_round_status"] = received.get("status")
    return {"samples": samples, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet", help="comma-separated: lenet, vit, mobilenetv2, gru")
    parser.add_argument("--batches", default="8,32", help="comma-separated batch sizes")
    parser.add_argument("--optimizer", choices=sorted(LR), default="sgd-momentum")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side and batch size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--samples", type=int, default=600, help="local samples of the memory round")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)

    node = prepare()
    threadpool_limits(1, user_api="blas")
    runs, files = [], []
    with tempfile.TemporaryDirectory(prefix="pf-step-node-") as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            model = family(name, folder)
            files.append(sizes(name, model, args.optimizer))
            f = files[-1]
            print(
                f"{name}: training step {f['step_bytes']:,} B ({f['step_with_initial_values_bytes']:,} B with "
                f"weights and state) vs inference ONNX {f['inference_onnx_bytes']:,} B"
            )
            for batch in [int(b) for b in args.batches.split(",")]:
                run = measure(name, model, args.optimizer, batch, args.steps, args.warmup, node, folder)
                runs.append(run)
                print(
                    f"  batch {batch:3d}: engine {run['engine_ms']:.2f} ms, onnxruntime-python "
                    f"{run['onnxruntime_python_ms']:.2f} ms, onnxruntime-node {run['onnxruntime_node_ms']:.2f} ms "
                    f"({run['onnxruntime_node_steps_per_s']:.0f} steps/s)"
                )
        memory = peak_memory(node, args.samples, folder)
        print(
            f"{args.samples}-sample LeNet round: TypeScript agent peak RSS {memory['js_agent_peak_rss_mib']} MiB "
            f"({memory['js_agent_round_s']} s), Python agent {memory['python_agent_peak_rss_mib']} MiB "
            f"({memory['python_agent_round_s']} s)"
        )
    summary = {"optimizer": args.optimizer, "threads": 1, "files": files, "runs": runs, "round_memory": memory}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Today's small model families through pocketfed, against onnxruntime and PyTorch in the same run.

For each family (tests/torch_families.py: a vision transformer, a MobileNetV2-style CNN with
depthwise convolutions and ReLU6, a GRU over Fashion-MNIST rows) a freshly initialised PyTorch
model is exported to ONNX (TorchScript exporter, opset 17, batch norm kept as nodes so both sides
train the same computation), imported, and trained for one epoch on the embedded Fashion-MNIST
subset ([0, 1] pixels, AdamW 1e-3, batch 64, the same initial weights and batch order) by
pocketfed's Trainer (what pf-train runs) and by PyTorch. Reported per family:

  params                 trainable parameters
  accuracy_pocketfed /   test accuracy after the epoch, pocketfed's model, and the same model
  accuracy_onnxruntime   exported back to ONNX and run by onnxruntime
  accuracy_torch         PyTorch's own epoch from the same start
  epoch_s_{1,2}thr       seconds for the epoch's training steps, pocketfed and PyTorch, 1 and 2 threads

    python bench/model_families.py --json            # last line: one JSON object
    python bench/model_families.py --limit 2048      # fewer training images, a quicker look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402
from torch_families import FAMILIES  # noqa: E402

from engine.data import NONE, ArrayDataset, load_default  # noqa: E402
from engine.onnx import export_onnx, import_onnx  # noqa: E402
from engine.optimizer import AdamW  # noqa: E402
from engine.trainer import Trainer, evaluate_model  # noqa: E402

BATCH, LR = 64, 1e-3


def export_keeping_batchnorm(module: torch.nn.Module, in_shape: tuple, path: Path) -> None:
    module.eval()
    torch.onnx.export(
        module, (torch.zeros(2, *in_shape),), str(path), dynamo=False, opset_version=17, input_names=["x"],
        output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False,
    )  # fmt: skip


def batches(n: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[k : k + BATCH] for k in range(0, n, BATCH)]


def pocketfed_epoch(path: Path, train: ArrayDataset, order: list[np.ndarray]) -> tuple[object, float]:
    model = import_onnx(path)
    trainer = Trainer(model, optimizer=AdamW(LR), batch_size=BATCH)
    start = time.perf_counter()
    for idx in order:
        x, y = train.get_batch(idx)
        trainer.step(x, y)
    return model, time.perf_counter() - start


def torch_epoch(module: torch.nn.Module, x: np.ndarray, y: np.ndarray, order: list[np.ndarray]) -> float:
    module.train()
    opt = torch.optim.AdamW(module.parameters(), LR, weight_decay=0.01)
    xt, yt = torch.tensor(x), torch.tensor(y)
    start = time.perf_counter()
    for idx in order:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(xt[idx]), yt[idx]).backward()
        opt.step()
    return time.perf_counter() - start


def accuracy_ort(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {"x": x})[0].argmax(1) == y))


def run_family(name: str, limit: int | None, workdir: Path) -> dict:
    cls, in_shape = FAMILIES[name]
    train, test = load_default("train", normalize=False), load_default("test", normalize=False)
    n = train.size() if limit is None else min(limit, train.size())
    shape = (-1, *in_shape)
    x_train, y_train = train.images[:n].reshape(shape), train.labels[:n]
    x_test, y_test = test.images.reshape(shape), test.labels
    torch.manual_seed(0)
    initial = cls()
    path = workdir / f"{name}.onnx"
    export_keeping_batchnorm(initial, in_shape, path)
    order = batches(n, seed=0)
    train_view = ArrayDataset(x_train, y_train)
    row: dict = {"family": name, "train_images": n, "batch": BATCH}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with threadpool_limits(threads):
            model, seconds = pocketfed_epoch(path, train_view, order)
            module = cls()
            module.load_state_dict(initial.state_dict())
            torch_seconds = torch_epoch(module, x_train, y_train, order)
        row[f"epoch_s_pocketfed_{threads}thr"] = round(seconds, 2)
        row[f"epoch_s_torch_{threads}thr"] = round(torch_seconds, 2)
        row[f"ratio_{threads}thr"] = round(seconds / torch_seconds, 2)
        if threads == 1:
            row["params"] = model.num_parameters()
            row["accuracy_pocketfed"] = evaluate_model(model, NONE.view(ArrayDataset(x_test, y_test), model))[
                "accuracy"
            ]
            tuned = workdir / f"{name}-tuned.onnx"
            export_onnx(model, tuned)
            row["accuracy_onnxruntime"] = accuracy_ort(tuned, x_test, y_test)
            module.eval()
            with torch.no_grad():
                row["accuracy_torch"] = float((module(torch.tensor(x_test)).argmax(1).numpy() == y_test).mean())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset")
    parser.add_argument("--limit", type=int, help="training images (default: all 9,000 of the embedded subset)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families.split(","):
            row = run_family(name, args.limit, Path(tmp))
            rows.append(row)
            print(
                f"{name:12s} params {row['params']:>7,}  acc pocketfed {row['accuracy_pocketfed']:.4f} "
                f"onnxruntime {row['accuracy_onnxruntime']:.4f} torch {row['accuracy_torch']:.4f}  epoch s "
                f"1thr {row['epoch_s_pocketfed_1thr']} vs {row['epoch_s_torch_1thr']} ({row['ratio_1thr']}x), "
                f"2thr {row['epoch_s_pocketfed_2thr']} vs {row['epoch_s_torch_2thr']} ({row['ratio_2thr']}x)",
                file=sys.stderr if args.json else sys.stdout,
            )
    if args.json:
        print(json.dumps({"families": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

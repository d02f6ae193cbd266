"""Parity with PyTorch: the same LeNet, the same initial weights, the same batches, step by step.

The engine's LeNet (`engine.models.lenet`) is copied into a torch.nn LeNet of the same layout;
both train with SGD + momentum on one shared sequence of batches (the permutation is drawn once
per epoch and fed to both), and then both are evaluated on the test split.

    python bench/parity_torch.py --json --data /usr/share/datasets/fashion-mnist
    # last line: {"steps", "max_rel_loss_diff_first10", "engine_test_accuracy", "torch_test_accuracy", ...}

Exits 2 with a message when torch is not installed. `--check` makes the exit status 1 when the
issue's bar is missed (max_rel_loss_diff_first10 <= 1e-4, accuracies within 0.5 points).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from engine.data import IDataView, MnistDataset, load_default  # noqa: E402
from engine.models import build  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

MAX_REL_LOSS_DIFF = 1e-4
MAX_ACCURACY_GAP_POINTS = 0.5


def torch_lenet(torch, weights: dict[str, np.ndarray]):
    """torch.nn LeNet with the engine's layout and the engine's weights.

    The engine stores fully connected weights as (in, out) for `x @ W` and conv biases as (C, 1, 1)
    for broadcasting; torch wants (out, in) and (C,).
    """
    nn = torch.nn
    model = nn.Sequential(
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
    layers = {"conv1": model[0], "conv2": model[3], "fc1": model[7], "fc2": model[9], "fc3": model[11]}
    with torch.no_grad():
        for name, layer in layers.items():
            w, b = weights[f"{name}.weight"], weights[f"{name}.bias"]
            layer.weight.copy_(torch.from_numpy(w if name.startswith("conv") else np.ascontiguousarray(w.T)))
            layer.bias.copy_(torch.from_numpy(b.reshape(-1)))
    return model


def epoch_orders(n: int, epochs: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(epochs)]


def torch_accuracy(torch, model, dataset: IDataView, batch_size: int = 1000) -> float:
    correct, n = 0, dataset.size()
    model.eval()
    with torch.no_grad():
        for start in range(0, n, batch_size):
            x, y = dataset.get_batch(np.arange(start, min(start + batch_size, n)))
            correct += int((model(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return correct / n


def run(args: argparse.Namespace, torch) -> dict:
    if args.data is None:
        train_set, test_set = load_default("train"), load_default("test")
    else:
        train_set, test_set = MnistDataset(args.data, split="train"), MnistDataset(args.data, split="test")
    orders = epoch_orders(train_set.size(), args.epochs, args.seed)
    size = args.batch_size
    batches = [order[i : i + size] for order in orders for i in range(0, len(order), size)]
    if args.max_steps:
        batches = batches[: args.max_steps]

    engine_model = build("lenet", seed=args.seed)
    optimizer = SGD(args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    trainer = Trainer(engine_model, optimizer=optimizer, batch_size=args.batch_size)
    torch_model = torch_lenet(torch, engine_model.state_dict())
    torch_opt = torch.optim.SGD(
        torch_model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    rel_diffs, engine_seconds, torch_seconds = [], 0.0, 0.0
    torch_model.train()
    for step, idx in enumerate(batches, start=1):
        x, y = train_set.get_batch(idx)
        x = np.asarray(x, np.float32)
        start = time.perf_counter()
        engine_loss, _ = trainer.step(x, y)
        engine_seconds += time.perf_counter() - start
        start = time.perf_counter()
        torch_opt.zero_grad()
        torch_loss = loss_fn(torch_model(torch.from_numpy(x)), torch.from_numpy(y))
        torch_loss.backward()
        torch_opt.step()
        torch_seconds += time.perf_counter() - start
        torch_loss = float(torch_loss.detach())
        rel_diffs.append(abs(engine_loss - torch_loss) / max(abs(torch_loss), 1e-12))
        if not args.quiet and (step % 100 == 0 or step == len(batches)):
            print(
                f"step {step}/{len(batches)}: engine loss {engine_loss:.5f}  torch loss {torch_loss:.5f}",
                file=sys.stderr,
            )

    engine_acc = trainer.evaluate(test_set)["accuracy"]
    torch_acc = torch_accuracy(torch, torch_model, test_set)
    return {
        "steps": len(batches),
        "max_rel_loss_diff_first10": max(rel_diffs[:10]),
        "engine_test_accuracy": engine_acc,
        "torch_test_accuracy": torch_acc,
        "accuracy_gap_points": round(100 * abs(engine_acc - torch_acc), 3),
        "max_rel_loss_diff_all": max(rel_diffs),
        "engine_train_seconds": round(engine_seconds, 2),
        "torch_train_seconds": round(torch_seconds, 2),
        "train_samples": train_set.size(),
        "test_samples": test_set.size(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="IDX directory (default: the embedded Fashion-MNIST subset)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)  # the seed's SGD(0.01f, 5e-4f, .9f)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: full epochs)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps sums in one order)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--check", action="store_true", help="exit 1 when the parity bar is missed")
    args = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("parity_torch: PyTorch is not installed (pip install 'pocketfed[dev]'); skipping.", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    result = run(args, torch)
    result["seconds"] = round(time.perf_counter() - start, 2)
    ok = (
        result["max_rel_loss_diff_first10"] <= MAX_REL_LOSS_DIFF
        and result["accuracy_gap_points"] <= MAX_ACCURACY_GAP_POINTS
    )
    if not args.quiet or not args.json:
        print(
            f"parity {'OK' if ok else 'MISSED'}: first-10 max relative loss diff "
            f"{result['max_rel_loss_diff_first10']:.2e} (bar {MAX_REL_LOSS_DIFF:g}), accuracy engine "
            f"{result['engine_test_accuracy']:.4f} vs torch {result['torch_test_accuracy']:.4f} "
            f"(bar {MAX_ACCURACY_GAP_POINTS} points)",
            file=sys.stderr if args.json else sys.stdout,
        )
    if args.json:
        print(json.dumps(result))
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())

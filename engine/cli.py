"""`pf-train` (also `python -m engine`): the seed's example for real — LeNet on Fashion-MNIST."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from .data import MnistDataset, load_default
from .models import build
from .optimizer import SGD
from .progress import ProgressBar
from .trainer import Trainer


def _datasets(data: str | None):
    if data is None:
        return load_default("train"), load_default("test")
    return MnistDataset(data, split="train"), MnistDataset(data, split="test")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pf-train", description="Train LeNet on (Fashion-)MNIST with the static-graph "
                                "engine. Default data: the Fashion-MNIST subset shipped in the package.")
    p.add_argument("--data", help="IDX directory (MNIST or Fashion-MNIST); default: embedded subset")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)
    train_set, test_set = _datasets(args.data)
    model = build("lenet", seed=args.seed)
    trainer = Trainer(model, optimizer=SGD(args.lr, weight_decay=args.weight_decay, momentum=args.momentum),
                      batch_size=args.batch_size, seed=args.seed)
    start = time.perf_counter()
    steps = -(-train_set.size() // args.batch_size)
    history = []
    for epoch in range(1, args.epochs + 1):
        with ProgressBar(steps, f"epoch {epoch}/{args.epochs}", enabled=not args.quiet) as bar:
            result = trainer.fit(train_set, 1, progress=lambda s: bar.update(postfix=f"loss {s['loss']:.3f}"))
        metrics = trainer.evaluate(test_set)
        history.append({"epoch": epoch, "train_loss": result["loss"], "test_accuracy": metrics["accuracy"]})
        print(f"epoch {epoch}: train loss {result['loss']:.4f}  test accuracy {metrics['accuracy']:.4f} "
              f"(n={metrics['n']})", file=sys.stderr if args.json else sys.stdout)
    summary = {"epochs": args.epochs, "test_accuracy": history[-1]["test_accuracy"],
               "final_loss": history[-1]["train_loss"], "seconds": round(time.perf_counter() - start, 3)}
    if args.json:
        print(json.dumps(summary))
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    from . import load
    from .data import open_dataset
    from .trainer import evaluate_model
    p = argparse.ArgumentParser(prog="pf-eval", description="Accuracy of a model file on a dataset.")
    p.add_argument("--model", required=True, help="pocketfed model file or .onnx")
    p.add_argument("--data", help="dataset path (IDX dir uses its test split); default: embedded test subset")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    dataset = load_default("test") if args.data is None else open_dataset(args.data, split="test")
    metrics = evaluate_model(load(args.model), dataset)
    out = {"accuracy": metrics["accuracy"], "n": metrics["n"]}
    print(json.dumps(out) if args.json else f"accuracy {out['accuracy']:.4f} on {out['n']} samples")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())

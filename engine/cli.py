"""`pf-train` (also `python -m engine`): the seed's example for real — LeNet on Fashion-MNIST — or,
with `--model FILE`, further training of a model you already have (pocketfed file or .onnx);
`--save FILE` writes the result (.onnx exports the inference graph); `--export-training-step OUT.onnx`
writes one training step as plain ONNX instead of training. `pf-eval` scores a model file."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from .data import load_default, open_dataset, record_preprocessing
from .models import ARCHITECTURES, build
from .optimizer import OPTIMIZERS, make_optimizer
from .progress import ProgressBar
from .trainer import Trainer


def _datasets(data: str | None):
    if data is None:
        return load_default("train"), load_default("test")
    return open_dataset(data, split="train"), open_dataset(data, split="test")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pf-train",
        description=(
            "Train LeNet (or --model FILE) on (Fashion-)MNIST with the static-graph engine. "
            "Default data: the Fashion-MNIST subset shipped in the package."
        ),
    )
    p.add_argument(
        "--data",
        help=(
            "IDX directory (train/test splits), .npz, .csv or image folder "
            "(used for both training and the test score); default: embedded subset"
        ),
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a model file (pocketfed or .onnx) or a built-in architecture (default: lenet)")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="sgd-momentum",
        help="sgd (with --weight-decay), sgd-momentum (with --momentum), adam or adamw (default: %(default)s)",
    )
    p.add_argument(
        "--export-training-step",
        metavar="OUT.onnx",
        help="write one training step (loss, gradients, optimizer) as a plain ONNX graph and exit "
        "(docs/training-step.md)",
    )
    p.add_argument(
        "--initial-values",
        action="store_true",
        help="with --export-training-step: store the weights, zero optimizer state and --lr as the inputs' defaults",
    )
    p.add_argument("--save", help="write the trained model here (.onnx: ONNX export; else a pocketfed file)")
    p.add_argument(
        "--train-only",
        nargs="+",
        metavar="PREFIX",
        help="train only parameters whose names start with one of these (e.g. the head: fc3)",
    )
    p.add_argument("--inference-only", action="store_true", help="--save without training-only parts")
    _normalize_option(p)
    p.add_argument("--clip-grad-norm", type=float, help="scale gradients down to this global norm")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true", help="print where a training step's time goes, per operator")
    return p


def _normalize_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--normalize",
        metavar="none|mnist|MEAN,STD",
        help=(
            "input preprocessing, on pixels scaled to [0, 1]: none, mnist (0.1307, 0.3081) or MEAN,STD "
            "(per channel M1:M2:M3,S1:S2:S3); default: what the model file records "
            "(an imported ONNX file: none)"
        ),
    )


def _preprocessing(prog: str, model, spec: str | None, quiet: bool = False):
    """The model's preprocessing (or the override), said on stderr so nobody is surprised."""
    from .data import preprocessing_for

    try:
        prep = preprocessing_for(model, spec)
    except ValueError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    if not quiet:
        where = "--normalize" if spec is not None else "the model"
        print(f"{prog}: preprocessing {prep.describe()} (from {where})", file=sys.stderr)
    return prep


def _user_errors(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Bad paths, corrupt files and mismatched models end in one clear line, not a traceback."""
    from .data import DataError
    from .graph import GraphError
    from .serialize.container import ContainerError

    try:
        return run(args)
    except (DataError, ContainerError, GraphError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def train_main(argv: Sequence[str] | None = None) -> int:
    return _user_errors("pf-train", _train, train_parser().parse_args(argv))


def _train(args: argparse.Namespace) -> int:
    if args.model is None or (args.model in ARCHITECTURES and not os.path.exists(args.model)):
        model = build(args.model or "lenet", seed=args.seed)
    else:
        model = _load_model(args.model)
    prep = _preprocessing("pf-train", model, args.normalize, args.quiet)
    trainable = None
    if args.train_only:
        trainable = [n for n in model.trainable if n.startswith(tuple(args.train_only))]
        if not trainable:
            print(f"pf-train: --train-only {args.train_only} matches none of {model.trainable}", file=sys.stderr)
            return 2
    optimizer = make_optimizer(args.optimizer, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.export_training_step:
        return _export_step(args, model, optimizer, trainable)
    train_set, test_set = _datasets(args.data)
    train_set, test_set = prep.view(train_set, model), prep.view(test_set, model)
    trainer = Trainer(
        model,
        optimizer=optimizer,
        clip_grad_norm=args.clip_grad_norm,
        trainable=trainable,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    trainer.train_fn.profile = args.profile
    start = time.perf_counter()
    steps = -(-train_set.size() // args.batch_size)
    history = []
    for epoch in range(1, args.epochs + 1):
        with ProgressBar(steps, f"epoch {epoch}/{args.epochs}", enabled=not args.quiet) as bar:
            result = trainer.fit(train_set, 1, progress=lambda s: bar.update(postfix=f"loss {s['loss']:.3f}"))
        metrics = trainer.evaluate(test_set)
        history.append({"epoch": epoch, "train_loss": result["loss"], "test_accuracy": metrics["accuracy"]})
        print(
            f"epoch {epoch}: train loss {result['loss']:.4f}  test accuracy {metrics['accuracy']:.4f} "
            f"(n={metrics['n']})",
            file=sys.stderr if args.json else sys.stdout,
        )
    summary = {
        "epochs": args.epochs,
        "test_accuracy": history[-1]["test_accuracy"],
        "final_loss": history[-1]["train_loss"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    if args.profile:
        print(trainer.train_fn.profile_report(), file=sys.stderr)
    if args.save:
        record_preprocessing(model, prep)  # the file says what it was trained on
        summary["saved"] = _save_model(model, args.save, args.inference_only)
    if args.json:
        print(json.dumps(summary))
    return 0


def _export_step(args: argparse.Namespace, model, optimizer, trainable) -> int:
    from .onnx import OnnxError, export_training_step

    try:
        data = export_training_step(
            model, args.export_training_step, optimizer, trainable=trainable, initial_values=args.initial_values
        )
    except OnnxError as exc:
        print(f"pf-train: cannot export the training step: {exc}", file=sys.stderr)
        return 2
    summary = {"training_step": args.export_training_step, "bytes": len(data), "optimizer": args.optimizer}
    print(
        json.dumps(summary) if args.json else f"wrote {args.export_training_step} ({len(data)} bytes, {args.optimizer})"
    )
    return 0


def _load_model(path: str):
    from . import load
    from .serialize.container import ContainerError

    try:
        return load(path)
    except FileNotFoundError:
        raise SystemExit(f"pf-train: model file {path} does not exist") from None
    except ContainerError as exc:
        raise SystemExit(f"pf-train: cannot load {path}: {exc}") from None


def _save_model(model, path: str, inference_only: bool) -> str:
    """Write the model; returns where it went."""
    if path.lower().endswith(".onnx"):
        from .onnx import export_onnx

        export_onnx(model, path)
    else:
        from .serialize.modelfile import save

        save(model, path, inference_only=inference_only)
    return path


def eval_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pf-eval", description="Accuracy of a model file on a dataset.")
    p.add_argument("--model", required=True, help="pocketfed model file or .onnx")
    p.add_argument("--data", help="dataset path (IDX dir uses its test split); default: embedded test subset")
    p.add_argument("--json", action="store_true")
    _normalize_option(p)
    return _user_errors("pf-eval", _evaluate, p.parse_args(argv))


def _evaluate(args: argparse.Namespace) -> int:
    from . import load
    from .data import open_dataset
    from .trainer import evaluate_model

    dataset = load_default("test") if args.data is None else open_dataset(args.data, split="test")
    model = load(args.model)
    prep = _preprocessing("pf-eval", model, args.normalize)
    metrics = evaluate_model(model, prep.view(dataset, model))
    out = {"accuracy": metrics["accuracy"], "n": metrics["n"]}
    print(json.dumps(out) if args.json else f"accuracy {out['accuracy']:.4f} on {out['n']} samples")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())

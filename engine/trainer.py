"""`Trainer`: attach a loss and an optimizer to a model's graph, compile once, run per batch.

This is the seed's training loop packaged for the device agent and the coordinator: a
training function (with updates) and an evaluation function (without) compiled from the
same graph, so they share the weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import opr
from .data import DataLoader, IDataView
from .graph import GraphError, SymbolVar
from .loss import ILoss
from .model import Model
from .optimizer import IOptimizer, Schedule
from .serialize.container import ContainerError, write_atomic
from .serialize.container import dumps as dump_container
from .serialize.container import loads as load_container
from .training_graph import build_training_graph


class Interrupted(RuntimeError):
    """`should_stop()` turned true during `fit`; the weights are left as they were mid-epoch."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class Trainer:
    def __init__(
        self,
        model: Model,
        loss: str | ILoss = "cross_entropy",
        optimizer: IOptimizer | None = None,
        trainable: Sequence[str] | None = None,
        prox_mu: float = 0.0,
        batch_size: int = 32,
        seed: int = 0,
        clip_grad_norm: float | None = None,
        schedule: Schedule | None = None,
        linear_term: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """`prox_mu` adds FedProx's mu/2 ||w - anchor||^2 to the objective; `linear_term` = g adds
        - <g, w> (zero for weights g does not name; `set_linear_term` changes it). FedDyn's device
        objective is both, with mu = alpha."""
        self.model, self.batch_size, self.seed = model, batch_size, seed
        try:
            training = build_training_graph(model, loss, optimizer, trainable, prox_mu, clip_grad_norm, linear_term)
        except GraphError as exc:
            raise type(exc)(f"Trainer: {exc}") from None
        self.optimizer, self.trainable = training.optimizer, [w.name for w in training.weights]
        self.loss_var, self._anchor, self._linear = training.loss, training.anchors, training.linear
        graph, logits, updates = model.graph, model.output, training.updates
        self.schedule, self.global_step = schedule, 0
        self.train_fn = graph.compile([self.loss_var, logits], updates=updates)
        self.eval_fn = graph.compile([logits], training=False)
        self._input_name = model.input.name

    # ----- weights -----
    def get_weights(self) -> dict[str, np.ndarray]:
        return self.model.state_dict()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.model.load_state_dict(weights, strict=False)
        self.reset_prox_anchor()

    def set_linear_term(self, g: Mapping[str, np.ndarray]) -> None:
        """g of the objective's - <g, w> (built with linear_term=True); names absent from g get zeros."""
        if not self._linear:
            raise ValueError("set_linear_term: this Trainer was built without a linear_term")
        for name, var in self._linear.items():
            value = g.get(name)
            if value is not None and np.shape(value) != var.value.shape:
                raise ValueError(f"set_linear_term: {name} has shape {np.shape(value)}, the weight {var.value.shape}")
            var.value[...] = 0 if value is None else value

    def reset_prox_anchor(self) -> None:
        """Make the current weights the FedProx reference point."""
        for name, anchor in self._anchor.items():
            np.copyto(anchor.value, self.model.params[name].value)

    # ----- checkpoints: resume training exactly where it stopped -----
    def checkpoint_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Everything the next `fit` depends on: weights and buffers, optimizer state, learning rate,
        FedProx anchors, the data-order seed and the dropout generators."""
        graph = self.model.graph
        tensors = {f"model/{n}": v.value for n, v in self.model.params.items()}
        state = getattr(self.optimizer, "state", {})
        tensors.update({f"optimizer/{n}": v.value for n, v in state.items() if v.graph is graph})
        tensors.update({f"prox_anchor/{n}": v.value for n, v in self._anchor.items()})
        metadata = {
            "format": "pocketfed-checkpoint",
            "seed": int(self.seed),
            "trainable": self.trainable,
            "optimizer": type(self.optimizer).__name__,
            "lr": getattr(self.optimizer, "lr", None),
            "dropout_rng": [m.op.rng_state() for m in _dropout_masks(graph)],
            "global_step": int(self.global_step),
        }
        return tensors, metadata

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically (a container of kind "checkpoint"); resume with `load_checkpoint`.

        Take it between `fit` calls: the data order of an epoch is drawn when `fit` starts."""
        tensors, metadata = self.checkpoint_state()
        write_atomic(path, dump_container(tensors, metadata, kind="checkpoint"))

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint into this trainer, whose model and optimizer must have the same shape."""
        container = load_container(Path(path).read_bytes(), kind="checkpoint")
        self.load_checkpoint_state(container.tensors, container.metadata)

    def load_checkpoint_state(self, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
        mine, _ = self.checkpoint_state()
        unknown, missing = sorted(set(tensors) - set(mine)), sorted(set(mine) - set(tensors))
        if unknown or missing:
            raise ContainerError(
                f"checkpoint does not fit this trainer: unknown {unknown}, missing "
                f"{missing} (same model, optimizer and trainable list needed)"
            )
        bad = [
            f"{n} {tensors[n].shape} vs {mine[n].shape}"
            for n in mine
            if tensors[n].shape != mine[n].shape or tensors[n].dtype != mine[n].dtype
        ]
        if bad:
            raise ContainerError(f"checkpoint tensors differ in shape or dtype: {bad}")
        masks = _dropout_masks(self.model.graph)
        rng_states = metadata.get("dropout_rng", [])
        if not isinstance(rng_states, list) or len(rng_states) != len(masks):
            raise ContainerError(
                f"checkpoint holds {len(rng_states)} dropout generator states, the model "
                f"has {len(masks)} dropout layers"
            )
        seed = metadata.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ContainerError(f"checkpoint seed must be a non-negative integer, got {seed!r}")
        for mask, rng_state in zip(masks, rng_states, strict=True):
            try:  # check them all first: a bad file must leave the trainer untouched
                mask.op.check_rng_state(rng_state)
            except (TypeError, ValueError, KeyError) as exc:
                raise ContainerError(f"checkpoint dropout generator state is invalid: {exc}") from None
        for name, value in tensors.items():
            np.copyto(mine[name], value)
        for mask, rng_state in zip(masks, rng_states, strict=True):
            mask.op.set_rng_state(rng_state)
        lr = metadata.get("lr")
        if isinstance(lr, (int, float)) and lr > 0 and hasattr(self.optimizer, "set_lr"):
            self.optimizer.set_lr(float(lr))
        self.seed = seed
        step = metadata.get("global_step", 0)
        self.global_step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0

    # ----- training -----
    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim == 0 or y.ndim == 0 or len(x) != len(y) or len(x) == 0:
            raise ValueError(
                f"training batch: input {self._input_name!r} has shape {x.shape} and 'label' has shape "
                f"{y.shape}; they need the same batch size, at least 1"
                + (" (the batch is empty)" if x.ndim and len(x) == 0 else "")
            )
        if self.schedule is not None:
            self.optimizer.set_lr(self.schedule(self.global_step))
        self.global_step += 1
        loss, logits = self.train_fn.execute({self._input_name: x, "label": y})
        return float(loss), logits

    def fit(
        self,
        dataset: IDataView,
        epochs: int = 1,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, float]:
        loader = DataLoader(
            dataset, batch_size=min(self.batch_size, dataset.size()), shuffle=True, drop_last=False, seed=self.seed
        )
        total_loss, correct, seen, steps = 0.0, 0, 0, 0
        for epoch in range(epochs):
            for x, y in loader:
                if should_stop is not None and should_stop():
                    raise Interrupted(f"stopped after {steps} steps")
                loss, logits = self.step(x, y)
                if not np.isfinite(loss):
                    raise FloatingPointError(f"training diverged: loss {loss} at step {steps}")
                total_loss += loss * len(y)
                correct += int((logits.argmax(axis=1) == y).sum())
                seen += len(y)
                steps += 1
                if progress is not None:
                    progress({"epoch": epoch, "step": steps, "loss": loss})
        self.seed += 1  # a fresh order next time fit is called
        return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1), "steps": steps, "samples": seen}

    # ----- evaluation -----
    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.eval_fn.execute({self._input_name: x})[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities."""
        return np.exp(_log_softmax(self.logits(np.asarray(x, np.float32))))

    def evaluate(self, dataset: IDataView, batch_size: int | None = None) -> dict[str, float]:
        """Loss and accuracy over `dataset`, in batches of the training batch size by default: as
        fast per sample as larger ones, and each batch size planned costs memory (runtime.py)."""
        return evaluate_function(self.eval_fn, self._input_name, dataset, batch_size or self.batch_size)

    def release(self) -> None:
        """Free the compiled functions' planned memory (arenas, workspaces) once a job is done.

        The trainer stays usable: the next step or evaluation plans again."""
        self.train_fn.release()
        self.eval_fn.release()


def _dropout_masks(graph: Any) -> list[SymbolVar]:
    return [v for v in graph.nodes if isinstance(v.op, opr.DropoutMask)]


def evaluate_function(eval_fn: Any, input_name: str, dataset: IDataView, batch_size: int = 256) -> dict[str, float]:
    total_loss, correct, n = 0.0, 0, dataset.size()
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}
    for start in range(0, n, batch_size):
        x, y = dataset.get_batch(np.arange(start, min(start + batch_size, n)))
        logits = eval_fn.execute({input_name: x})[0]
        log_p = _log_softmax(logits)
        total_loss -= float(log_p[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    return {"loss": total_loss / n, "accuracy": correct / n, "n": n}


def evaluate_model(
    model: Model, dataset: IDataView, batch_size: int = 256, preprocessing: Any = None
) -> dict[str, float]:
    """Loss and accuracy of `model` on `dataset`. `preprocessing`: None feeds the dataset as it
    is; "model" applies what the model records (engine.data.preprocessing_for); a
    `Preprocessing` or a spec ("none", "mnist", "MEAN,STD") applies that."""
    if preprocessing is not None:
        from .data import preprocessing_for

        prep = preprocessing_for(model, None if preprocessing == "model" else preprocessing)
        dataset = prep.view(dataset, model)
    return evaluate_function(model.graph.compile([model.output], training=False), model.input.name, dataset, batch_size)


def evaluate_model_bytes(
    model_bytes: bytes, dataset: IDataView, batch_size: int = 256, preprocessing: Any = None
) -> dict[str, float]:
    """`evaluate_model` of a model file's bytes (the coordinator's server-side evaluation)."""
    from .serialize.modelfile import loads

    return evaluate_model(loads(model_bytes), dataset, batch_size, preprocessing)

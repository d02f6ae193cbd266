"""The training graph of a model: label input, loss, symbolic gradients and optimizer updates.

One function builds it, so everything that trains builds the same graph: `Trainer` compiles
it for the engine's runtime, and `engine.onnx.export_training_step` lowers it to ONNX.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import opr
from .autodiff import grad
from .graph import GraphError, SymbolVar
from .loss import LOSSES, ILoss
from .model import Model
from .optimizer import SGD, IOptimizer, clip_by_global_norm

LABEL = "label"  # the name of the label input every training graph feeds


@dataclass
class TrainingGraph:
    model: Model
    label: SymbolVar
    loss: SymbolVar  # the loss as reported (without the FedProx term)
    weights: list[SymbolVar]  # the trained weights, in the order given
    updates: list[SymbolVar]  # one AddUpdate per weight; optimizer state updates hang off them
    optimizer: IOptimizer
    anchors: dict[str, SymbolVar] = field(default_factory=dict)  # weight name -> FedProx anchor
    linear: dict[str, SymbolVar] = field(default_factory=dict)  # weight name -> g of the -<g, w> term


def build_training_graph(
    model: Model,
    loss: str | ILoss = "cross_entropy",
    optimizer: IOptimizer | None = None,
    trainable: Sequence[str] | None = None,
    prox_mu: float = 0.0,
    clip_grad_norm: float | None = None,
    linear_term: Mapping[str, np.ndarray] | None = None,
) -> TrainingGraph:
    """Add label, loss, gradients and updates for `trainable` (default: `model.trainable`) to the model's graph."""
    optimizer = optimizer or SGD(0.01, momentum=0.9)
    names = list(model.trainable if trainable is None else trainable)
    unknown = [n for n in names if n not in model.params]
    if unknown:
        raise GraphError(f"unknown parameters {unknown}; the model has {list(model.params)}")
    if not names:
        raise GraphError("nothing to train")
    graph, prediction = model.graph, model.output
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise GraphError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}")
        loss = LOSSES[loss]()
    if LABEL in graph:
        label = graph[LABEL]
    else:
        shape, dtype = loss.label_input(prediction)
        label = opr.host2device(graph, shape, dtype, LABEL)
    loss_var = loss(prediction, label)
    objective = loss_var
    weights = [model.params[n] for n in names]
    anchors: dict[str, SymbolVar] = {}
    if prox_mu:  # FedProx: mu/2 * ||w - w_global||^2 keeps local training near the global model
        for w in weights:
            anchors[w.name] = opr.shared(graph, w.value, f"{w.name}.prox_anchor", trainable=False)
        prox = sum(
            (opr.sum((w - anchors[w.name]) ** 2.0) for w in weights[1:]),
            start=opr.sum((weights[0] - anchors[weights[0].name]) ** 2.0),
        )
        objective = objective + prox * (prox_mu / 2)
    linear: dict[str, SymbolVar] = {}
    if linear_term is not None:  # FedDyn: - <g, w>, g a per-device state (zero where not given)
        for w in weights:
            g = np.zeros_like(w.value) if w.name not in linear_term else np.asarray(linear_term[w.name], w.value.dtype)
            if g.shape != w.value.shape:
                raise GraphError(f"linear term of {w.name} has shape {g.shape}, the weight {w.value.shape}")
            linear[w.name] = opr.shared(graph, g, f"{w.name}.linear_term", trainable=False)
            objective = objective - opr.sum(linear[w.name] * w)
    grads = grad(objective, weights)
    if clip_grad_norm is not None:  # one global norm over every gradient (clip_grad_norm_)
        grads = clip_by_global_norm(grads, clip_grad_norm)
    updates = optimizer.make_multiple(weights, grads, graph)
    return TrainingGraph(model, label, loss_var, weights, updates, optimizer, anchors, linear)

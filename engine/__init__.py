"""pocketfed's engine: a define-then-run training engine on numpy, after MegEngine's on-device training.

graph = ComputingGraph()
x = opr.host2device(graph, (None, 1, 28, 28), name="x")      # opr::Host2DeviceCopy::make
...build the forward graph from opr.* ...
loss = CrossEntropyLoss()(logits, label)                     # ILoss
grads = grad(loss, weights)                                  # cg::grad
updates = SGD(0.01, momentum=0.9).make_multiple(weights, grads, graph)
func = graph.compile([loss], updates=updates)                # graph->compile()
func.execute(x=images, label=labels)                         # func->execute()

Importing `engine` loads nothing else: each public name below is imported from its module
on first use (PEP 562), so a program that only reads a container or a data set never loads
the compiler, the runtime or ONNX support.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> (module, attribute in it)
_EXPORTS: dict[str, tuple[str, str]] = {
    "grad": ("engine.autodiff", "grad"),
    "ComputingGraph": ("engine.graph", "ComputingGraph"),
    "GraphError": ("engine.graph", "GraphError"),
    "ShapeError": ("engine.graph", "ShapeError"),
    "SymbolVar": ("engine.graph", "SymbolVar"),
    "BCEWithLogitsLoss": ("engine.loss", "BCEWithLogitsLoss"),
    "CrossEntropyLoss": ("engine.loss", "CrossEntropyLoss"),
    "ILoss": ("engine.loss", "ILoss"),
    "L1Loss": ("engine.loss", "L1Loss"),
    "MSELoss": ("engine.loss", "MSELoss"),
    "Model": ("engine.model", "Model"),
    "SGD": ("engine.optimizer", "SGD"),
    "Adam": ("engine.optimizer", "Adam"),
    "AdamW": ("engine.optimizer", "AdamW"),
    "IOptimizer": ("engine.optimizer", "IOptimizer"),
    "Optimizer": ("engine.optimizer", "Optimizer"),
    "ModelFileError": ("engine.serialize.modelfile", "ModelFileError"),
    "save": ("engine.serialize.modelfile", "save"),
    "load_model_bytes": ("engine.serialize.modelfile", "loads"),
}
# Graphs and their values are built by operators, which also give them arithmetic and
# constants (engine/opr/methods.py): handing these out loads the operator layer too.
_NEEDS_OPERATORS = {"ComputingGraph", "SymbolVar"}
_SUBMODULES = {
    "autodiff",
    "cli",
    "compiler",
    "data",
    "graph",
    "loss",
    "model",
    "models",
    "nn",
    "onnx",
    "opr",
    "optimizer",
    "progress",
    "runtime",
    "serialize",
    "trainer",
    "training_graph",
}

if TYPE_CHECKING:
    from . import opr
    from .autodiff import grad
    from .graph import ComputingGraph, GraphError, ShapeError, SymbolVar
    from .loss import BCEWithLogitsLoss, CrossEntropyLoss, ILoss, L1Loss, MSELoss
    from .model import Model
    from .optimizer import SGD, Adam, AdamW, IOptimizer, Optimizer
    from .serialize.modelfile import ModelFileError, save
    from .serialize.modelfile import loads as load_model_bytes


def load(path) -> Model:
    """Load a pocketfed model file (or an .onnx file, with the `onnx` extra installed)."""
    if str(path).lower().endswith(".onnx"):
        from .onnx import import_onnx

        return import_onnx(path)
    from .serialize.modelfile import load as load_pocketfed

    return load_pocketfed(path)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        if name in _NEEDS_OPERATORS:
            importlib.import_module("engine.opr")
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"engine.{name}")
    else:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})


__all__ = [
    "Adam",
    "AdamW",
    "BCEWithLogitsLoss",
    "ComputingGraph",
    "CrossEntropyLoss",
    "GraphError",
    "ILoss",
    "IOptimizer",
    "L1Loss",
    "MSELoss",
    "Model",
    "ModelFileError",
    "Optimizer",
    "SGD",
    "ShapeError",
    "SymbolVar",
    "grad",
    "load",
    "load_model_bytes",
    "opr",
    "save",
]

"""pocketfed's engine: a define-then-run training engine on numpy, after MegEngine's on-device training.

graph = ComputingGraph()
x = opr.host2device(graph, (None, 1, 28, 28), name="x")      # opr::Host2DeviceCopy::make
...build the forward graph from opr.* ...
loss = CrossEntropyLoss()(logits, label)                     # ILoss
grads = grad(loss, weights)                                  # cg::grad
updates = SGD(0.01, momentum=0.9).make_multiple(weights, grads, graph)
func = graph.compile([loss], updates=updates)                # graph->compile()
func.execute(x=images, label=labels)                         # func->execute()
"""

from . import opr
from .autodiff import grad
from .graph import ComputingGraph, GraphError, ShapeError, SymbolVar
from .loss import BCEWithLogitsLoss, CrossEntropyLoss, ILoss, L1Loss, MSELoss
from .model import Model
from .optimizer import SGD, Adam, IOptimizer, Optimizer
from .serialize.modelfile import ModelFileError, save
from .serialize.modelfile import load as _load_pocketfed
from .serialize.modelfile import loads as load_model_bytes


def load(path) -> Model:
    """Load a pocketfed model file (or an .onnx file, with the `onnx` extra installed)."""
    if str(path).lower().endswith(".onnx"):
        from .onnx import import_onnx

        return import_onnx(path)
    return _load_pocketfed(path)


__all__ = [
    "Adam",
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

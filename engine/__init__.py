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

__all__ = ["ComputingGraph", "SymbolVar", "GraphError", "ShapeError", "grad", "opr"]

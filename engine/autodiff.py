"""Symbolic reverse-mode differentiation (MegEngine's `cg::grad`).

The backward pass is not a tape replayed at run time: each operator's gradient rule adds
ordinary nodes to the same graph, so the compiler optimizes forward and backward together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .graph import GraphError, SymbolVar, ancestors
from .opr import Add


def grad(target: SymbolVar, wrt: SymbolVar | Sequence[SymbolVar]) -> SymbolVar | list[SymbolVar]:
    """d target / d wrt as new graph nodes. `target` must be a scalar (a loss)."""
    single = isinstance(wrt, SymbolVar)
    wrt_list = [wrt] if single else list(wrt)
    if target.shape != ():
        raise GraphError(
            f"grad: the target must be a scalar, got shape {target.shape} ({target!r}); reduce it (sum or mean) first"
        )
    if target.dtype.kind != "f":
        raise GraphError(f"grad: the target must be floating point, got {target.dtype}")
    for w in wrt_list:
        if w.graph is not target.graph:
            raise GraphError(f"grad: {w!r} belongs to another graph")

    # Only nodes on a path from some wrt to the target need a gradient.
    order = ancestors([target])
    wanted = {w.id for w in wrt_list}
    on_path: set[int] = set()
    for node in order:  # topological order: inputs first
        if node.id in wanted or any(i.id in on_path for i in node.inputs):
            on_path.add(node.id)

    grads: dict[int, SymbolVar] = {target.id: target.make_scalar(1.0)}
    for node in reversed(order):
        g = grads.get(node.id)
        if g is None or not node.inputs:
            continue
        input_grads = node.op.grad(node, g)
        for inp, ig in zip(node.inputs, input_grads, strict=True):
            if ig is None or inp.id not in on_path:
                continue
            grads[inp.id] = Add.make(grads[inp.id], ig) if inp.id in grads else ig

    out = []
    for w in wrt_list:
        g = grads.get(w.id)
        if g is None:  # the target does not depend on w
            g = w.graph.constant(np.zeros(w.shape, w.dtype))
        out.append(g)
    return out[0] if single else out

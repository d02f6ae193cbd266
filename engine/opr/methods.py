"""What the operator layer adds to the graph layer: SymbolVar's arithmetic and methods, and
`ComputingGraph.constant`, in one table.

engine/graph.py knows no operator, so it cannot say what `a + b` builds; this module, which
knows them, installs the answers when engine.opr is imported (as MegEngine's opr library
defines `operator+` for SymbolVar). Every SymbolVar is made by an operator, so none exists
before these are in place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..graph import ComputingGraph, SymbolVar
from . import functional as F
from .io import ImmutableTensor


def _reshape(self: SymbolVar, *shape: int | Sequence[int]) -> SymbolVar:
    target = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    return F.reshape(self, target)


def _flatten(self: SymbolVar, start_axis: int = 1) -> SymbolVar:
    return F.flatten(self, start_axis)


def _transpose(self: SymbolVar, *perm: int) -> SymbolVar:
    return F.transpose(self, perm or None)


def _sum(self: SymbolVar, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> SymbolVar:
    return F.sum(self, axis, keepdims)


def _mean(self: SymbolVar, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> SymbolVar:
    return F.mean(self, axis, keepdims)


SYMBOLVAR_METHODS: dict[str, Callable[..., SymbolVar]] = {
    "__add__": lambda a, b: F.add(a, b),
    "__radd__": lambda a, b: F.add(b, a),
    "__sub__": lambda a, b: F.sub(a, b),
    "__rsub__": lambda a, b: F.sub(b, a),
    "__mul__": lambda a, b: F.mul(a, b),
    "__rmul__": lambda a, b: F.mul(b, a),
    "__truediv__": lambda a, b: F.div(a, b),
    "__rtruediv__": lambda a, b: F.div(b, a),
    "__pow__": lambda a, b: F.pow(a, b),
    "__neg__": lambda a: F.neg(a),
    "__matmul__": lambda a, b: F.matrix_mul(a, b),
    "reshape": _reshape,
    "flatten": _flatten,
    "transpose": _transpose,
    "sum": _sum,
    "mean": _mean,
}


def _constant(self: ComputingGraph, value: Any, dtype: Any = None) -> SymbolVar:
    """A constant node (an ImmutableTensor) holding `value`."""
    return ImmutableTensor.make(self, np.asarray(value, dtype=dtype))


def install() -> None:
    for name, method in SYMBOLVAR_METHODS.items():
        method.__name__, method.__qualname__ = name, f"SymbolVar.{name}"
        setattr(SymbolVar, name, method)
    SymbolVar.__array_priority__ = 1000  # make `ndarray + SymbolVar` call SymbolVar.__radd__
    ComputingGraph.constant = _constant

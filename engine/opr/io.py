"""Source operators: where values enter the graph.

`Host2DeviceCopy` is fed a fresh array each step; `SharedDeviceTensor` holds state that
lives across steps (weights, optimizer buffers) and is written by updates; `ImmutableTensor`
is a constant. Their kernels are never called: the runtime supplies their values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..graph import ComputingGraph, GraphError, Shape, SymbolVar
from .base import Operator


class _Source(Operator):
    is_source = True
    n_inputs = 0

    def infer(self, *inputs: SymbolVar) -> tuple[Shape, np.dtype]:
        raise GraphError(f"{self.type_name} is created with its own make()")

    def forward(self, *xs: np.ndarray) -> np.ndarray:
        raise GraphError(f"{self.type_name} has no kernel: the runtime supplies its value")


class Host2DeviceCopy(_Source):
    """An input fed on every `execute` (shape may hold None for sizes known only then)."""

    @classmethod
    def make(cls, graph: ComputingGraph, shape: Sequence[int | None], dtype: str | np.dtype = "float32",
             name: str = "input") -> SymbolVar:
        shape = tuple(None if d is None or d < 0 else int(d) for d in shape)
        op = cls(shape=list(shape), dtype=np.dtype(dtype).name)
        return graph._add(SymbolVar(graph, op, (), shape, np.dtype(dtype), name=name))


class SharedDeviceTensor(_Source):
    """State kept across steps; updates write it in place, so every function sees one copy."""

    @classmethod
    def make(cls, graph: ComputingGraph, value: np.ndarray, name: str, trainable: bool = True) -> SymbolVar:
        value = np.array(value, copy=True)  # the graph owns its state; dtype is kept as given
        op = cls(trainable=bool(trainable))
        return graph._add(SymbolVar(graph, op, (), value.shape, value.dtype, name=name, value=value))


class ImmutableTensor(_Source):
    """A constant folded into the graph."""

    @classmethod
    def make(cls, graph: ComputingGraph, value: np.ndarray, name: str | None = None) -> SymbolVar:
        value = np.asarray(value)
        value.setflags(write=False)
        return graph._add(SymbolVar(graph, cls(), (), value.shape, value.dtype, name=name, value=value))

    def key(self) -> tuple:  # constants merge only by identity; the compiler compares values itself
        return (self.type_name, id(self))

"""Source operators: where values enter the graph.

`Host2DeviceCopy` is fed a fresh array each step; `SharedDeviceTensor` holds state that
lives across steps (weights, optimizer buffers) and is written by updates; `ImmutableTensor`
is a constant. Their kernels are never called: the runtime supplies their values.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np

from ..graph import ComputingGraph, GraphError, Shape, SourceKind, SymbolVar
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

    source_kind = SourceKind.INPUT

    @classmethod
    def make(
        cls, graph: ComputingGraph, shape: Sequence[int | None], dtype: str | np.dtype = "float32", name: str = "input"
    ) -> SymbolVar:
        shape = tuple(None if d is None or d < 0 else int(d) for d in shape)
        op = cls(shape=list(shape), dtype=np.dtype(dtype).name)
        return graph._add(SymbolVar(graph, op, (), shape, np.dtype(dtype), name=name))


class SharedDeviceTensor(_Source):
    """State kept across steps; updates write it in place, so every function sees one copy."""

    source_kind = SourceKind.SHARED

    @classmethod
    def make(cls, graph: ComputingGraph, value: np.ndarray, name: str, trainable: bool = True) -> SymbolVar:
        value = np.asarray(value)
        kind = "trainable" if trainable else name.rsplit(".", 1)[-1]  # weights; or each kind of state
        copy = _POOLS.setdefault(graph, _Pool()).take(value.shape, value.dtype, kind)
        np.copyto(copy, value)  # the graph owns its state; dtype is kept as given
        value = copy
        op = cls(trainable=bool(trainable))
        return graph._add(SymbolVar(graph, op, (), value.shape, value.dtype, name=name, value=value))


class _Pool:
    """Where a graph's shared tensors live: tensors of one kind and dtype (all weights; all
    momentum buffers...) end to end in one chunk, in creation order. The arrays are ordinary
    and separate; being adjacent lets the compiler's flat_updates treat many of them as one
    flat array, with no copy (engine/compiler/updates.py)."""

    CHUNK = 1 << 20  # elements; untouched pages of a chunk cost no memory

    def __init__(self) -> None:
        self.lanes: dict[tuple, list] = {}  # (kind, dtype) -> [chunk, used]

    def take(self, shape: tuple, dtype: np.dtype, kind: str) -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64))
        if size < 2 or dtype.hasobject:
            return np.empty(shape, dtype)
        lane = self.lanes.get((kind, dtype.str))
        if lane is None or lane[1] + size > lane[0].size:
            lane = self.lanes[(kind, dtype.str)] = [np.empty(max(self.CHUNK, size), dtype), 0]
        array = lane[0][lane[1] : lane[1] + size].reshape(shape)
        lane[1] += size
        return array


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ImmutableTensor(_Source):
    """A constant folded into the graph."""

    source_kind = SourceKind.CONST

    @classmethod
    def make(cls, graph: ComputingGraph, value: np.ndarray, name: str | None = None) -> SymbolVar:
        value = np.asarray(value)
        value.setflags(write=False)
        return graph._add(SymbolVar(graph, cls(), (), value.shape, value.dtype, name=name, value=value))

    def key(self) -> tuple:  # constants merge only by identity; the compiler compares values itself
        return (self.type_name, id(self))

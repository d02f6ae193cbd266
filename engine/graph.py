"""The computing graph: `SymbolVar` nodes created by operators, shapes known as each is added.

A `SymbolVar` is both MegEngine's VarNode and its handle: one value in the graph, the
operator that produces it and that operator's inputs. Building the graph runs no kernel;
`ComputingGraph.compile` turns a set of outputs and updates into a function you execute.

This is the engine's bottom layer: it knows no operator. The operator layer gives SymbolVar
its arithmetic (`a + b`, `x.reshape(...)`) and the graph its constants, in one table
(engine/opr/methods.py), as MegEngine's opr library defines `operator+` for SymbolVar.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .opr.base import Operator
    from .runtime import CompiledFunction

Shape = tuple  # of int | None; None is a size known only when data is fed (e.g. the batch size)


class GraphError(ValueError):
    """The graph was built or used wrongly (mixed graphs, bad grad target, unknown feed...)."""


class ShapeError(GraphError):
    """An operator's inputs have shapes or dtypes it cannot take; raised when the node is added."""


class SourceKind(enum.Enum):
    """What a source node (an operator without inputs) holds; `Operator.source_kind` says it."""

    INPUT = "input"  # fed on every execute (Host2DeviceCopy)
    SHARED = "shared"  # state kept across steps: weights, optimizer buffers (SharedDeviceTensor)
    CONST = "const"  # a constant (ImmutableTensor)


class SymbolVar:
    """One value in a graph: produced by `op` from `inputs`, with a static shape and dtype.

    Source values (fed inputs, shared tensors, constants) have an operator with no inputs;
    shared tensors and constants hold their array in `value`.
    """

    def __init__(
        self,
        graph: ComputingGraph,
        op: Operator,
        inputs: Sequence[SymbolVar],
        shape: Shape,
        dtype: np.dtype,
        name: str | None = None,
        value: np.ndarray | None = None,
    ):
        self.graph = graph
        self.op = op
        self.inputs = tuple(inputs)
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.name = name
        self.value = value
        self.id = next(graph._ids)
        # Updates that must run whenever this value is computed (optimizer state, running stats).
        self.side_updates: list[SymbolVar] = []

    # ----- description -----
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_source(self) -> bool:
        return not self.inputs and self.op.is_source

    def __repr__(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"SymbolVar#{self.id}{label}({self.op.type_name}, shape={self.shape}, dtype={self.dtype})"

    def __hash__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:  # identity: SymbolVars are dict keys
        return self is other

    def make_scalar(self, value: float) -> SymbolVar:
        """A constant scalar of this var's dtype (MegEngine's `SymbolVar::make_scalar`)."""
        return self.graph.constant(np.asarray(value, dtype=self.dtype))


class ComputingGraph:
    """Owns the nodes; `compile` turns chosen outputs and updates into an executable function."""

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.nodes: list[SymbolVar] = []  # insertion order is a valid topological order
        self._names: dict[str, SymbolVar] = {}

    # ----- adding nodes (operators call this) -----
    def _add(self, var: SymbolVar) -> SymbolVar:
        if var.name is not None and var.op.is_source:
            if var.name in self._names:
                raise GraphError(f"a source named {var.name!r} already exists in this graph")
            self._names[var.name] = var
        self.nodes.append(var)
        return var

    def constant(self, value: Any, dtype: Any = None) -> SymbolVar:
        """A constant node. engine.opr replaces this with its ImmutableTensor (engine/opr/methods.py)."""
        raise GraphError("graph.constant needs the operators: import engine.opr first")

    def __getitem__(self, name: str) -> SymbolVar:
        try:
            return self._names[name]
        except KeyError:
            raise GraphError(f"no input or shared tensor named {name!r} in this graph") from None

    def __contains__(self, name: str) -> bool:
        return name in self._names

    @property
    def inputs(self) -> dict[str, SymbolVar]:
        return {n: v for n, v in self._names.items() if v.op.source_kind is SourceKind.INPUT}

    @property
    def shared(self) -> dict[str, SymbolVar]:
        return {n: v for n, v in self._names.items() if v.op.source_kind is SourceKind.SHARED}

    def compile(
        self,
        outputs: SymbolVar | Sequence[SymbolVar] = (),
        updates: Iterable[SymbolVar] = (),
        training: bool | None = None,
        **options: Any,
    ) -> CompiledFunction:
        """Compile once, execute per batch. `training` defaults to "there are updates"."""
        # Compiling belongs to the top layer (engine/runtime.py). This deferred import is the
        # engine's one upward edge, kept so that MegEngine's `graph.compile()` works on any graph
        # (declared in pyproject.toml's "engine layers" contract).
        from .runtime import compile_function

        single = isinstance(outputs, SymbolVar)
        outs = [outputs] if single else list(outputs)
        ups = list(updates)
        for var in [*outs, *ups]:
            if not isinstance(var, SymbolVar) or var.graph is not self:
                raise GraphError(f"{var!r} is not a SymbolVar of this graph")
        mode = bool(ups) if training is None else training
        return compile_function(self, outs, ups, training=mode, single_output=single, **options)


def ancestors(roots: Iterable[SymbolVar]) -> list[SymbolVar]:
    """Every node the roots depend on (roots included), in topological (creation) order."""
    seen: dict[int, SymbolVar] = {}
    stack = list(roots)
    while stack:
        var = stack.pop()
        if var.id in seen:
            continue
        seen[var.id] = var
        stack.extend(var.inputs)
    return sorted(seen.values(), key=lambda v: v.id)

"""The operator contract: every operator states its shape rule, its kernel and its gradient.

An `Operator` subclass is the single place to read everything about one operation:
  - `infer(*inputs)`   the shape/dtype rule, run when the node is added (errors surface at build time)
  - `forward(*arrays)` the numpy kernel, run by the compiled function
  - `grad(out, dout)`  the gradient rule, written with other operators (autodiff is symbolic)
Attributes are plain JSON values so a graph can be saved to a model file and rebuilt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np

from ..graph import ComputingGraph, GraphError, Shape, ShapeError, SourceKind, SymbolVar

OPERATORS: dict[str, type[Operator]] = {}  # type name -> class, for model files


class Operator(ABC):
    type_name: ClassVar[str] = "Operator"
    is_source: ClassVar[bool] = False  # fed input, shared tensor or constant
    source_kind: ClassVar[SourceKind | None] = None  # which of the three, for a source
    n_inputs: ClassVar[int | None] = None  # None: any number

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__
        OPERATORS[cls.__name__] = cls

    def __init__(self, **attrs: Any) -> None:
        self.attrs = _Attrs(self, attrs)

    def __getattr__(self, name: str) -> Any:
        attrs = self.__dict__.get("attrs", {})
        if name in attrs:
            return attrs[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ----- the three rules -----
    @abstractmethod
    def infer(self, *inputs: SymbolVar) -> tuple[Shape, np.dtype]:
        """The shape rule: output shape and dtype, or ShapeError naming the operator and shapes."""

    @abstractmethod
    def forward(self, *xs: np.ndarray) -> np.ndarray:
        """The kernel."""

    def grad(self, out: SymbolVar, dout: SymbolVar) -> Sequence[SymbolVar | None]:
        raise GraphError(f"{self.type_name} has no gradient rule")

    # ----- running into planned memory (see engine/compiler/memory.py) -----
    # An elementwise operator's output[i] depends only on its inputs at i, so the output may
    # overwrite a same-shaped input that nobody reads afterwards (the in-place pass).
    elementwise: ClassVar[bool] = False
    # Inputs the kernel reads only the shape of (a gradient's `like`, a mean's count): a node whose
    # other inputs are constants computes the same value every step under one plan, so the runtime
    # computes it once per plan and drops the instruction (see engine/runtime.py).
    shape_only_inputs: ClassVar[tuple[int, ...]] = ()

    def passes_through(self, *xs: np.ndarray) -> int | None:
        """k when, for inputs shaped like `xs`, the result is input k unchanged (same shape and
        dtype): the plan then makes the output that input's buffer instead of copying it."""
        return None

    def forward_into(self, ws: Workspace, out: np.ndarray, *xs: np.ndarray) -> None:
        """Write the result into the preallocated `out`; scratch arrays come from `ws`.

        The fallback calls `forward` and copies (it allocates); operators on hot paths override
        it so that a planned step allocates nothing. Overrides must give `forward`'s exact bits.
        """
        np.copyto(out, self.forward(*xs))

    def bind(self, ws: Workspace, out: np.ndarray, *xs: np.ndarray) -> Callable[..., None]:
        """This operator's kernel for one planned instruction: called with the step's inputs, it
        fills `out` exactly as `forward_into(ws, out, ...)` would.

        `xs` are example inputs: every step under the plan brings arrays of these shapes and
        dtypes (not necessarily these very arrays). Hot operators override this to work out, once,
        what depends only on shapes and on `out` (axes, slices, views of `out` and of scratch
        arrays), so that a step's call is little more than the numpy calls themselves."""
        return partial(self.forward_into, ws, out)

    @classmethod
    def writes_into(cls) -> bool:
        """True when the operator has its own allocation-free `forward_into`."""
        return cls.forward_into is not Operator.forward_into

    # ----- building -----
    @classmethod
    def make(cls, *inputs: Any, name: str | None = None, **attrs: Any) -> SymbolVar:
        """Add this operator to the inputs' graph and return its output (MegEngine's `opr::X::make`)."""
        return cls.rebuild(as_vars(inputs), attrs, name=name)

    @classmethod
    def rebuild(cls, inputs: Sequence[SymbolVar], attrs: dict[str, Any], name: str | None = None) -> SymbolVar:
        """Add a node from attributes as stored (`make` normalizes user arguments first; model files
        call this directly), running the shape rule, which raises at build time."""
        op = cls(**attrs)
        if op.n_inputs is not None and len(inputs) != op.n_inputs:
            raise ShapeError(f"{cls.__name__} takes {op.n_inputs} inputs, got {len(inputs)}")
        shape, dtype = op.infer(*inputs)
        graph = inputs[0].graph
        return graph._add(SymbolVar(graph, op, inputs, shape, dtype, name=name))

    def key(self) -> tuple:
        """Identity of the computation for common-subexpression merging."""
        return (type(self), repr(sorted(self.attrs.items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.attrs.items())
        return f"{self.type_name}({args})"


class _Attrs(dict):
    """An operator's attributes, mirrored as plain instance attributes: kernels read them every
    step, and that is much faster than `__getattr__`. Writes (`op.attrs["trainable"] = False`)
    update the mirror; names the class itself defines stay reachable only through the dict."""

    def __init__(self, owner: Operator, items: dict[str, Any]) -> None:
        super().__init__()
        self._owner = owner
        for name, value in items.items():
            self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(name, value)
        if not hasattr(type(self._owner), name):
            self._owner.__dict__[name] = value

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._owner.__dict__.pop(name, None)


class Workspace:
    """Scratch arrays one instruction keeps between steps (column buffers, padded copies, masks).

    Made on first use and handed back unchanged afterwards, so a steady-state step allocates
    nothing; `zero=True` zeroes an array once at creation (e.g. padding borders that stay
    zero) and `init` fills it once.
    """

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.memo: dict[Any, Any] = {}  # anything else a kernel works out once per shape

    def get(
        self,
        name: str,
        shape: tuple,
        dtype: np.dtype,
        zero: bool = False,
        init: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """The scratch array `name`, made (zeroed, or filled by `init`) when missing or reshaped."""
        array = self.arrays.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
            if init is not None:
                init(array)
            self.arrays[name] = array
        return array

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


# ----- helpers shared by operators -----


def as_vars(items: Sequence[Any]) -> list[SymbolVar]:
    """Turn python scalars / arrays among SymbolVars into constants of the same graph and dtype."""
    vars_ = [x for x in items if isinstance(x, SymbolVar)]
    if not vars_:
        raise GraphError("an operator needs at least one SymbolVar input")
    graph: ComputingGraph = vars_[0].graph
    dtype = vars_[0].dtype
    out = []
    for x in items:
        if isinstance(x, SymbolVar):
            if x.graph is not graph:
                raise GraphError("inputs come from different graphs")
            out.append(x)
        else:
            arr = np.asarray(x)
            if arr.dtype.kind in "fiub" and arr.ndim == 0 and dtype.kind == "f":
                arr = arr.astype(dtype)
            out.append(graph.constant(arr))
    return out


def broadcast_shapes(op: str, *shapes: Shape) -> Shape:
    """numpy broadcasting with None (unknown until fed) sizes; raises naming op and shapes."""
    ndim = max(len(s) for s in shapes)
    padded = [(1,) * (ndim - len(s)) + tuple(s) for s in shapes]
    out = []
    for dims in zip(*padded):
        known = {d for d in dims if d is not None and d != 1}
        if len(known) > 1:
            raise ShapeError(f"{op}: shapes {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast")
        if known:
            out.append(known.pop())
        elif None in dims:
            out.append(None)
        else:
            out.append(1)
    return tuple(out)


def result_dtype(*vars_: SymbolVar) -> np.dtype:
    return np.result_type(*[v.dtype for v in vars_])


def normalize_axes(axis: int | Sequence[int] | None, ndim: int, op: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ShapeError(f"{op}: axis {a} is out of range for {ndim} dimensions")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def same_size(a: int | None, b: int | None) -> bool:
    return a is None or b is None or a == b


def shape_str(shape: Shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"

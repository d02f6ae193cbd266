"""Shape arithmetic at import time: PyTorch's `x.view(x.size(0), -1)` exports as
Shape -> Gather -> Unsqueeze -> Concat -> Reshape. The engine's graphs are static, so these chains
are evaluated here, on numpy arrays, instead of becoming operators.

A shape value is a 1-D numpy array. Sizes known at build time are plain ints; a size fed at run time
(the batch) is a `Dim` naming the tensor and axis it came from, in an object array. `Dim`s can be
gathered, unsqueezed, concatenated and sliced, but not multiplied: that is a clear error. A Reshape
whose target holds one `Dim` becomes the engine's Reshape with -1 in that place (see `reshape_target`).
The same converters also handle ordinary tensors (Squeeze/Unsqueeze as reshapes, Slice, Cast, Concat).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import opr
from ..graph import SymbolVar
from ..opr.shape import Slice


class Dim:
    """The run-time size of `axis` of tensor `var` (None in its static shape), times `factor`:
    attention's reshapes multiply the batch by the number of heads."""

    def __init__(self, var: SymbolVar, axis: int, factor: int = 1) -> None:
        self.var, self.axis, self.factor = var, axis, factor

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Dim) and other.var is self.var and other.axis == self.axis and other.factor == self.factor
        )

    def __hash__(self) -> int:
        return hash((self.var.id, self.axis, self.factor))

    def __mul__(self, other: object) -> Dim:
        if isinstance(other, (int, np.integer)) and not isinstance(other, bool) and other > 0:
            return Dim(self.var, self.axis, self.factor * int(other))
        raise TypeError(f"cannot multiply {self!r} by {other!r}")

    __rmul__ = __mul__

    def __floordiv__(self, other: object) -> Dim:
        if isinstance(other, (int, np.integer)) and other > 0 and self.factor % int(other) == 0:
            return Dim(self.var, self.axis, self.factor // int(other))
        raise TypeError(f"cannot divide {self!r} by {other!r}")

    __truediv__ = __floordiv__

    def __repr__(self) -> str:
        times = f" * {self.factor}" if self.factor != 1 else ""
        return f"size({self.var.name or f'#{self.var.id}'}, axis {self.axis}){times}"


def is_dynamic(value: np.ndarray) -> bool:
    return value.dtype == object and any(isinstance(d, Dim) for d in value.ravel())


def shape_value(shape: tuple, var: SymbolVar | None) -> np.ndarray:
    """A tensor's shape as a shape value: ints where static, `Dim`s where fed late."""
    if var is None or None not in shape:
        return np.asarray(shape, np.int64)
    return np.array([Dim(var, i) if d is None else int(d) for i, d in enumerate(shape)], dtype=object)


def _axes(im: Any, node: Any, position: int, name: str = "axes") -> list[int] | None:
    """Axes given as an input (opset >= 13 for Squeeze/Unsqueeze, always for Slice) or as an attribute."""
    if len(node.input) > position and node.input[position]:
        return [int(a) for a in im.constant_input(node.input[position], f"the {node.op_type} {name}")]
    value = im.attrs().get(name)
    return None if value is None else [int(a) for a in value]


def _static_or_var(im: Any, name: str) -> np.ndarray | SymbolVar:
    return im.static[name] if name in im.static else im.var(name)


# ----- converters -----


def shape(im: Any, node: Any) -> np.ndarray:
    source = _static_or_var(im, node.input[0])
    value = shape_value(source.shape, None if isinstance(source, np.ndarray) else source)
    a = im.attrs()  # opset 15: Shape(start, end)
    return value[a.get("start", 0) : a.get("end", len(value))]


def gather(im: Any, node: Any) -> np.ndarray | SymbolVar:
    axis = int(im.attrs().get("axis", 0))
    data, index = node.input
    if data in im.static and index in im.static:
        table = im.static[data]
        return np.asarray(np.take(table, im.static[index], axis=axis), dtype=table.dtype)  # 0-d stays an array
    table = im.var(data)
    if data in im.vars and index not in im.static and axis == 0 and table.ndim == 2:
        return opr.embedding(table, im.var(index))  # nn.Embedding
    raise im.fail(
        f"Gather is supported on shape values and as an embedding lookup (2-D table, axis 0, "
        f"computed indices), got data {table.shape}, axis {axis}"
    )


def unsqueeze(im: Any, node: Any) -> np.ndarray | SymbolVar:
    axes = _axes(im, node, 1)
    if axes is None:
        raise im.fail("Unsqueeze needs axes")
    source = _static_or_var(im, node.input[0])
    ndim = len(source.shape) + len(axes)
    axes = sorted(a % ndim for a in axes)
    if isinstance(source, np.ndarray):
        return np.expand_dims(source, tuple(axes))
    dims = list(source.shape)
    for a in axes:
        dims.insert(a, 1)
    return _reshape_var(im, source, dims)


def squeeze(im: Any, node: Any) -> np.ndarray | SymbolVar:
    source = _static_or_var(im, node.input[0])
    axes = _axes(im, node, 1)
    ndim = len(source.shape)
    axes = [i for i, d in enumerate(source.shape) if d == 1] if axes is None else [a % ndim for a in axes]
    if any(source.shape[a] != 1 for a in axes):
        raise im.fail(f"Squeeze axes {axes} must have size 1, shape is {tuple(source.shape)}")
    if isinstance(source, np.ndarray):
        return np.squeeze(source, tuple(axes))
    return _reshape_var(im, source, [d for i, d in enumerate(source.shape) if i not in axes])


def _reshape_var(im: Any, x: SymbolVar, dims: list) -> SymbolVar:
    if dims.count(None) > 1:
        raise im.fail(f"cannot reshape {x.shape} to {dims}: more than one size is fed at run time")
    return opr.reshape(x, [-1 if d is None else d for d in dims])


def concat(im: Any, node: Any) -> np.ndarray | SymbolVar:
    axis = int(im.attrs()["axis"])
    if all(n in im.static for n in node.input):
        parts = [im.static[n] for n in node.input]
        dtype = object if any(p.dtype == object for p in parts) else None
        return np.concatenate([p.astype(dtype) if dtype else p for p in parts], axis=axis)
    return opr.concat([im.var(n) for n in node.input], axis=axis)


def cast(im: Any, node: Any) -> np.ndarray | SymbolVar:
    dtype = im.onnx.helper.tensor_dtype_to_np_dtype(im.attrs()["to"])
    name = node.input[0]
    if name not in im.static:
        return opr.astype(im.var(name), dtype)
    value = im.static[name]
    if is_dynamic(value):
        if dtype.kind not in "iu":
            raise im.fail(f"cannot cast shape {list(value)} (fed at run time) to {dtype}")
        return value
    return value.astype(dtype)


def slice_(im: Any, node: Any) -> np.ndarray | SymbolVar:
    if len(node.input) < 3:  # opset < 10: starts/ends/axes attributes
        a = im.attrs()
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts = im.constant_input(node.input[1], "the Slice starts")
        ends = im.constant_input(node.input[2], "the Slice ends")
        axes, steps = _axes(im, node, 3), _axes(im, node, 4, "steps")
    source = _static_or_var(im, node.input[0])
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if isinstance(source, np.ndarray):
        index = [slice(None)] * source.ndim
        for axis, start, end, step in zip(axes, starts, ends, steps):
            index[axis] = slice(int(start), int(end), int(step))
        return source[tuple(index)]
    x = source
    for axis, start, end, step in zip(axes, starts, ends, steps):
        axis = int(axis) % x.ndim
        size = x.shape[axis]
        start, end = int(start), int(end)
        if size is not None:  # clamp as numpy does; the largest int64 means "to the end"
            start, end, _ = slice(start, end).indices(size)
        if step != 1 or start < 0 or end < 0:
            raise im.fail(
                f"Slice of a computed tensor needs step 1 and non-negative bounds on static axes, "
                f"got [{start}:{end}:{step}] on axis {axis} of {x.shape}"
            )
        x = Slice.make(x, axis=axis, start=start, stop=end)
    return x


def constant_of_shape(im: Any, node: Any) -> np.ndarray:
    dims = im.constant_input(node.input[0], "the ConstantOfShape shape")
    if is_dynamic(dims):
        raise im.fail(f"ConstantOfShape with a size fed at run time ({list(dims)}) is not supported")
    value = im.attrs().get("value")
    fill = im.onnx.numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    return np.full([int(d) for d in dims], fill[0], fill.dtype)


# ----- Reshape -----


def reshape_target(im: Any, x: SymbolVar, target: np.ndarray, allowzero: bool) -> list[int]:
    """The engine's Reshape target for an ONNX one: ints, with -1 where the run-time size goes.

    0 copies the input's size (unless allowzero). A `Dim` with no -1 beside it becomes -1 (the
    static entries fix it). `x.view(x.size(0), -1)` has both: when the `Dim` is the only
    run-time size of `x` (its own, or the batch axis 0 of any tensor placed at 0: the batch size
    is the same all through a network), the -1 is computed here from `x`'s static sizes.
    """
    dims: list = []
    for i, d in enumerate(target):
        if not isinstance(d, Dim):
            d = int(d)
            if d == 0 and not allowzero and i < x.ndim:
                d = Dim(x, i) if x.shape[i] is None else x.shape[i]
        dims.append(d)
    fed = [i for i, d in enumerate(dims) if isinstance(d, Dim)]
    inferred = [i for i, d in enumerate(dims) if d == -1 and not isinstance(d, Dim)]
    if len(fed) + len(inferred) > 1:
        if len(fed) == 1 and len(inferred) == 1 and _only_fed_size_of(dims[fed[0]], fed[0], x):
            static = int(np.prod([d for d in x.shape if d is not None], dtype=np.int64))
            known = int(np.prod([d for i, d in enumerate(dims) if i not in (fed[0], inferred[0])], dtype=np.int64))
            known *= dims[fed[0]].factor
            if known == 0 or static % known:
                raise im.fail(f"cannot reshape {x.shape} to {dims}")
            dims[inferred[0]] = static // known
        else:
            raise im.fail(f"Reshape target {dims} leaves more than one size to infer for input {x.shape}")
    return [-1 if isinstance(d, Dim) else int(d) for d in dims]


def _only_fed_size_of(dim: Dim, position: int, x: SymbolVar) -> bool:
    fed_axes = [i for i, d in enumerate(x.shape) if d is None]
    if dim.var is x:
        return fed_axes == [dim.axis]
    return fed_axes == [0] and dim.axis == 0 and position == 0

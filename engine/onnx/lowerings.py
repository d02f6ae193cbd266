"""Lowering engine nodes to standard ONNX (opset 17), one small function per operator class.

`LOWERINGS` maps an operator class to `fn(lw, node, ins, out)`: `node` is the engine node
(its `op`, `inputs`, static `shape` and `dtype`), `ins` the ONNX names of its inputs, and the
function adds ONNX nodes through `lw` that compute `out`. Forward operators fall back to the
inference exporter's `EMITTERS` (same signature), so each operator's ONNX form is written once.
A new operator needs one decorated function:

    @lowering(opr.Gelu)
    def _gelu(lw, node, ins, out):
        lw.add("Gelu", ins, out)   # or a composition of standard operators

The backward-only operators autodiff adds (convolution and pooling gradients, ReluGrad,
softmax cross-entropy...) are in gradients.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import opr
from ..compiler.program import Node
from ..opr.base import Operator
from .exporter import EMITTERS
from .importer import OnnxError, require_onnx

Lowering = Callable[["Lowerer", Node, list[str], str], None]
LOWERINGS: dict[type[Operator], Lowering] = {}

# Binary arithmetic: numpy mixes dtypes (float * bool), ONNX wants one type; inputs are cast to
# the node's dtype. Comparisons cast to the inputs' common type.
_ARITHMETIC = (opr.Add, opr.Sub, opr.Mul, opr.Div, opr.Pow, opr.Maximum)
_COMPARISONS = (opr.Equal, opr.Greater, opr.GreaterEqual)


def lowering(*classes: type[Operator]) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the ONNX lowering of `classes`."""

    def register(fn: Lowering) -> Lowering:
        for cls in classes:
            LOWERINGS[cls] = fn
        return fn

    return register


def find_lowering(op: Operator) -> Lowering | None:
    cls = type(op)
    return LOWERINGS.get(cls) or EMITTERS.get(cls)


def lowered_operators() -> list[str]:
    return sorted({cls.type_name for cls in [*LOWERINGS, *EMITTERS]})


class Lowerer:
    """Collects ONNX nodes and initializers; the same calls as the inference exporter (`add`,
    `constant`, `onnx`), plus fresh names, casts and shape helpers for the lowerings."""

    def __init__(self) -> None:
        self.onnx = require_onnx()
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.extra_inputs: list[tuple[str, tuple, np.dtype, dict]] = []  # inputs lowerings add (dropout masks)
        self.dtypes: dict[str, np.dtype] = {}  # ONNX value -> its element type, where known
        self._constants: dict[tuple, str] = {}
        self._count = 0

    # ----- names and nodes -----
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def add(self, op_type: str, inputs: Sequence[str], output: str | Sequence[str], **attrs: Any) -> None:
        outputs = [output] if isinstance(output, str) else list(output)
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), outputs, name=outputs[0], **attrs))

    def op(self, op_type: str, inputs: Sequence[str], **attrs: Any) -> str:
        """Add a one-output node with a fresh output name; returns that name."""
        out = self.fresh(op_type)
        self.add(op_type, inputs, out, **attrs)
        return out

    def constant(self, value: Any, hint: str = "c") -> str:
        """An initializer holding `value` (its dtype as given); equal small constants are shared."""
        array = np.asarray(value)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 64 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        name = self.fresh(f"{hint}_const")
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        self.dtypes[name] = array.dtype
        if key is not None:
            self._constants[key] = name
        return name

    def ints(self, values: Sequence[int]) -> str:
        return self.constant(np.asarray(list(values), np.int64), "ints")

    def cast(self, name: str, dtype: np.dtype) -> str:
        """`name` as `dtype` (a Cast node only when its known type differs)."""
        dtype = np.dtype(dtype)
        known = self.dtypes.get(name)
        if known is not None and known == dtype:  # (np.dtype(None) is float64: compare only known types)
            return name
        out = self.op("Cast", [name], to=self.onnx.helper.np_dtype_to_tensor_dtype(dtype))
        self.dtypes[out] = dtype
        return out

    # ----- shapes: constants where the engine knows them, Shape/Size of a value where it does not -----
    def shape_of(self, name: str, shape: tuple) -> str:
        return self.ints(shape) if None not in shape else self.op("Shape", [name])

    def zeros(self, name: str, shape: tuple, dtype: np.dtype) -> str:
        """Zeros of `shape` (the static shape of value `name`) and `dtype`."""
        value = self.onnx.numpy_helper.from_array(np.zeros(1, dtype))
        return self.op("ConstantOfShape", [self.shape_of(name, shape)], value=value)

    def static(self, node: Node, *sizes: int | None) -> list[int]:
        """Sizes a lowering needs at export time; refused, naming the node, when fed late."""
        if any(s is None for s in sizes):
            raise OnnxError(f"cannot lower {node.op.type_name} with sizes known only at run time: {node_label(node)}")
        return [int(s) for s in sizes]

    # ----- one engine node -----
    def lower(self, node: Node, ins: list[str], out: str) -> None:
        fn = find_lowering(node.op)
        if fn is None:
            raise OnnxError(
                f"operator {node.op.type_name} has no ONNX lowering (node {node_label(node)}); "
                f"add one with @lowering(...) in engine/onnx/; lowered operators: {', '.join(lowered_operators())}"
            )
        if isinstance(node.op, _ARITHMETIC):
            ins = [self.cast(i, node.dtype) for i in ins]
        elif isinstance(node.op, _COMPARISONS):
            ins = [self.cast(i, np.result_type(*[x.dtype for x in node.inputs])) for i in ins]
        fn(self, node, ins, out)
        self.dtypes.setdefault(out, node.dtype)


def node_label(node: Node) -> str:
    """The engine's own description of a node (its SymbolVar when it came from a graph)."""
    return repr(node.origin) if node.origin is not None else repr(node)


# ----- shape and broadcasting operators -----


@lowering(opr.BroadcastLike)
def _broadcast_like(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    like = node.inputs[1]
    lw.add("Expand", [ins[0], lw.shape_of(ins[1], like.shape)], out)


@lowering(opr.SumToShapeOf)
def _sum_to_shape_of(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    x, like = node.inputs
    lead = len(x.shape) - len(like.shape)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(like.shape) if d == 1 and x.shape[lead + i] != 1]
    if not axes:
        lw.add("Identity", [ins[0]], out)
        return
    summed = lw.op("ReduceSum", [ins[0], lw.ints(axes)], keepdims=1)
    lw.add("Reshape", [summed, lw.shape_of(ins[1], like.shape)], out)


@lowering(opr.ReshapeLike)
def _reshape_like(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    keep = set(node.op.attrs["keep_axes"])
    like = node.inputs[1]
    target = [1 if i in keep else d for i, d in enumerate(like.shape)]
    if None in target:  # the fed sizes from `like` at run time, 1 on the kept axes
        mask = lw.constant(np.asarray([i in keep for i in range(len(target))]))
        shape = lw.op("Where", [mask, lw.ints([1] * len(target)), lw.op("Shape", [ins[1]])])
    else:
        shape = lw.ints(target)
    lw.add("Reshape", [ins[0], shape], out)


@lowering(opr.CountRatio)
def _count_ratio(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    reduced, x = node.inputs
    if None not in reduced.shape and None not in x.shape:  # the engine's arithmetic: a double, then rounded
        ratio = int(np.prod(reduced.shape, dtype=np.int64)) / int(np.prod(x.shape, dtype=np.int64))
        lw.add("Identity", [lw.constant(np.asarray(ratio, node.dtype))], out)
        return
    sizes = [lw.cast(lw.op("Size", [name]), np.dtype(np.float64)) for name in ins]
    lw.add("Cast", [lw.op("Div", sizes)], out, to=lw.onnx.helper.np_dtype_to_tensor_dtype(node.dtype))


@lowering(opr.BesselCorrection)
def _bessel_correction(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """n / (n - 1) with n = size(x) / size(reduced), computed in double as the engine does. The
    engine's error for n < 2 has no ONNX form: the runtime computes inf there instead."""
    reduced, x = node.inputs
    if None not in reduced.shape and None not in x.shape:
        n = int(np.prod(x.shape, dtype=np.int64)) // max(int(np.prod(reduced.shape, dtype=np.int64)), 1)
        lw.add("Identity", [lw.constant(np.asarray(n / (n - 1) if n > 1 else np.inf, node.dtype))], out)
        return
    sizes = [lw.cast(lw.op("Size", [name]), np.dtype(np.float64)) for name in (ins[1], ins[0])]
    n = lw.op("Floor", [lw.op("Div", sizes)])
    ratio = lw.op("Div", [n, lw.op("Sub", [n, lw.constant(np.asarray(1.0))])])
    lw.add("Cast", [ratio], out, to=lw.onnx.helper.np_dtype_to_tensor_dtype(node.dtype))


@lowering(opr.MatchShape)
def _match_shape(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """The value itself: the step's inputs declare the label with the prediction's shape, so the
    engine's run-time check has nothing left to catch that the runtime's input check does not."""
    lw.add("Identity", [ins[0]], out)


@lowering(opr.Slice)
def _slice(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    a = node.op.attrs
    lw.add("Slice", [ins[0], lw.ints([a["start"]]), lw.ints([a["stop"]]), lw.ints([a["axis"]])], out)


@lowering(opr.PadSlice)
def _pad_slice(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """Zeros like `like` with x at [start:] along the axis: Pad with zeros before and after."""
    x, like = node.inputs
    axis, start = node.op.attrs["axis"] % len(x.shape), node.op.attrs["start"]
    size, total = lw.static(node, x.shape[axis], like.shape[axis])
    pads = [0] * (2 * len(x.shape))
    pads[axis], pads[len(x.shape) + axis] = start, total - start - size
    lw.add("Pad", [ins[0], lw.ints(pads)], out)


@lowering(opr.Sum)
def _sum(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """ReduceSum; a count of booleans (Max's gradient) is summed as int64, as numpy does."""
    source = ins[0]
    if node.inputs[0].dtype == np.bool_:
        source = lw.cast(source, np.dtype(np.int64))
        lw.dtypes[out] = np.dtype(np.int64)
    axes, keep = list(node.op.attrs["axes"]), int(node.op.attrs["keepdims"])
    lw.add("ReduceSum", [source, lw.ints(axes)], out, keepdims=keep)


@lowering(opr.ExpOf)
def _exp_of(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    lw.add("Exp", ins, out)


@lowering(opr.AddUpdate)
def _add_update(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """dest*alpha + delta*beta + bias, in the kernel's order of operations (engine/opr/update.py)."""
    op, (dest, delta) = node.op, node.inputs
    dtype = dest.dtype
    value = lw.cast(ins[1], dtype)
    if op.beta != 1:
        value = lw.op("Mul", [value, lw.constant(np.asarray(op.beta, dtype))])
    if op.alpha == 0:
        if tuple(delta.shape) != tuple(dest.shape):
            value = lw.op("Expand", [value, lw.ints(dest.shape)])
    elif op.alpha == 1:
        value = lw.op("Add", [ins[0], value])
    else:
        value = lw.op("Add", [lw.op("Mul", [ins[0], lw.constant(np.asarray(op.alpha, dtype))]), value])
    if op.bias:
        value = lw.op("Add", [value, lw.constant(np.asarray(op.bias, dtype))])
    lw.add("Identity", [value], out)

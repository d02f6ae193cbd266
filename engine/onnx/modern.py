"""ONNX converters for today's small models: transformers (LayerNormalization, batched MatMul,
Erf, Where/Expand, Split, Gather of a token), mobile CNNs (Clip as ReLU6, HardSwish,
HardSigmoid, nearest Resize) and the reductions and comparisons their exports use. Shape
arithmetic stays at import time (shapes.py); sizes fed at run time become `BroadcastTo`'s
reference axes. Registered in importer.CONVERTERS."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import opr
from ..graph import SymbolVar
from .shapes import Dim, _axes, _static_or_var, is_dynamic


def _optional(node: Any, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def layer_normalization(im: Any, node: Any) -> SymbolVar:
    if any(node.output[1:]):
        raise im.fail("the Mean and InvStdDev outputs of LayerNormalization are not supported")
    a = im.attrs()
    x = im.var(node.input[0])
    scale = im.var(node.input[1], like=x)
    bias = im.var(node.input[2], like=x) if _optional(node, 2) else None
    return opr.layer_norm(x, scale, bias, axis=int(a.get("axis", -1)), eps=float(a.get("epsilon", 1e-5)))


def matmul(im: Any, node: Any) -> SymbolVar:
    """(..., K) @ (K, N) folds the leading axes into one product; stacks of matrices (attention)
    broadcast their leading axes."""
    x, w = im.var(node.input[0]), im.var(node.input[1])
    if x.ndim < 2 or w.ndim < 2:
        raise im.fail(f"MatMul of 1-D operands is not supported, got {x.shape} @ {w.shape}")
    if w.ndim == 2 and x.ndim > 2:
        lead = [-1 if d is None else d for d in x.shape[:-1]]
        if lead.count(-1) <= 1:
            y = opr.matrix_mul(opr.reshape(x, (-1, x.shape[-1])), w)
            return opr.reshape(y, (*lead, w.shape[1]))
    return opr.matmul(x, w)


def where(im: Any, node: Any) -> SymbolVar | np.ndarray:
    cond, a, b = node.input
    if all(n in im.static for n in node.input):  # shape arithmetic (PyTorch's expand(-1) handling)
        return np.where(im.static[cond].astype(bool), im.static[a], im.static[b])
    x = im.vars.get(a) or im.vars.get(b)
    return opr.where(im.var(cond), im.var(a, like=x), im.var(b, like=x))


def expand(im: Any, node: Any) -> SymbolVar:
    x = im.var(node.input[0])
    target = im.constant_input(node.input[1], "the Expand shape")
    dims, refs = [], []
    for d in target:
        if isinstance(d, Dim):
            if d.factor != 1:
                raise im.fail(f"Expand to {list(target)}: a run-time size times {d.factor} is not supported")
            dims.append((None, d.axis))
            refs.append(d.var)
        else:
            dims.append((int(d), None))
    if len({id(r) for r in refs}) > 1:
        raise im.fail(f"Expand to {list(target)} reads run-time sizes of more than one tensor")
    ndim = max(len(dims), x.ndim)
    dims = [(1, None)] * (ndim - len(dims)) + dims
    return opr.broadcast_to(x, [d for d, _ in dims], refs[0] if refs else None, [a for _, a in dims])


def constant_of_shape(im: Any, node: Any) -> np.ndarray | SymbolVar:
    """A constant; a size fed at run time (PyTorch's zero initial state of a GRU) is a broadcast."""
    dims = im.constant_input(node.input[0], "the ConstantOfShape shape")
    value = im.attrs().get("value")
    fill = im.onnx.numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    if not is_dynamic(dims):
        return np.full([int(d) for d in dims], fill[0], fill.dtype)
    refs = {id(d.var): d for d in dims if isinstance(d, Dim)}
    if len(refs) > 1 or any(d.factor != 1 for d in refs.values()):
        raise im.fail(f"ConstantOfShape {list(dims)} reads more than one run-time size")
    ref = next(iter(refs.values())).var
    base = im.graph.constant(np.full([1] * len(dims), fill[0], fill.dtype))
    shape = [None if isinstance(d, Dim) else int(d) for d in dims]
    return opr.broadcast_to(base, shape, ref, [d.axis if isinstance(d, Dim) else None for d in dims])


def split(im: Any, node: Any) -> list[SymbolVar]:
    x = im.var(node.input[0])
    a = im.attrs()
    axis = int(a.get("axis", 0)) % x.ndim
    sizes = _optional(node, 1)
    if sizes is not None:
        sizes = [int(s) for s in im.constant_input(sizes, "the Split sizes")]
    elif "split" in a:  # opset < 13
        sizes = [int(s) for s in a["split"]]
    else:
        count = int(a.get("num_outputs", len(node.output)))
        total = x.shape[axis]
        if total is None:
            raise im.fail(f"Split of axis {axis} of {x.shape}, fed at run time, needs explicit sizes")
        step = -(-total // count)
        sizes = [min(step, total - k * step) for k in range(count)]
    return opr.split(x, sizes, axis)


def gather(im: Any, node: Any) -> np.ndarray | SymbolVar:
    """Shape values and embeddings (shapes.gather); and picking positions of a tensor with
    constant indices (a transformer's class token: x[:, 0])."""
    from .shapes import gather as gather_shapes

    data, index = node.input
    if index not in im.static or data in im.static:
        return gather_shapes(im, node)
    x = im.var(data)
    axis = int(im.attrs().get("axis", 0)) % x.ndim
    indices = np.asarray(im.static[index])
    size = x.shape[axis]
    if indices.ndim > 1 or (size is None and np.any(indices < 0)):
        raise im.fail(f"Gather of a tensor needs 0-D or 1-D constant indices, got {indices.tolist()} on {x.shape}")
    picks = [int(i) % size if size is not None else int(i) for i in indices.reshape(-1)]
    parts = [opr.Slice.make(x, axis=axis, start=i, stop=i + 1) for i in picks]
    y = parts[0] if len(parts) == 1 else opr.concat(parts, axis=axis)
    if indices.ndim == 1:
        return y
    dims = [-1 if d is None else d for i, d in enumerate(y.shape) if i != axis]
    if dims.count(-1) > 1:
        raise im.fail(f"Gather on {x.shape}: more than one size fed at run time")
    return opr.reshape(y, dims)


def reduce(kind: str):
    fns = {"mean": opr.mean, "sum": opr.sum, "max": opr.max}

    def convert(im: Any, node: Any) -> SymbolVar:
        x = im.var(node.input[0])
        a = im.attrs()
        axes = _axes(im, node, 1)  # an input from opset 13 (ReduceSum) / 18 (the others), else the attribute
        if axes is None:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        return fns[kind](x, [int(v) % x.ndim for v in axes], bool(a.get("keepdims", 1)))

    return convert


def clip(im: Any, node: Any) -> SymbolVar:
    a = im.attrs()
    low, high = a.get("min"), a.get("max")  # opset < 11
    if _optional(node, 1):
        low = float(im.constant_input(node.input[1], "the Clip minimum"))
    if _optional(node, 2):
        high = float(im.constant_input(node.input[2], "the Clip maximum"))
    return opr.clip(im.var(node.input[0]), low, high)


def hard_sigmoid(im: Any, node: Any) -> SymbolVar:
    a = im.attrs()
    return opr.hard_sigmoid(im.var(node.input[0]), float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))


def resize(im: Any, node: Any) -> SymbolVar:
    a = {k: v.decode() if isinstance(v, bytes) else v for k, v in im.attrs().items()}
    if a.get("mode", "nearest") != "nearest":
        raise im.fail(f"Resize mode {a.get('mode')!r} is not supported (nearest is)")
    x = im.var(node.input[0])
    if x.ndim != 4 or None in x.shape[2:]:
        raise im.fail(f"Resize needs an NCHW input with static height and width, got {x.shape}")
    sizes, scales = _optional(node, 3), _optional(node, 2)
    if sizes is not None:
        target = list(im.constant_input(sizes, "the Resize sizes"))[-2:]
    elif scales is not None:
        factors = [float(f) for f in im.constant_input(scales, "the Resize scales")]
        if factors[:2] != [1.0, 1.0]:
            raise im.fail(f"Resize scales {factors} change the batch or channel axes")
        target = [int(np.floor(d * f)) for d, f in zip(x.shape[2:], factors[2:])]
    else:
        raise im.fail("Resize needs scales or sizes")
    coordinate = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    return opr.resize_nearest(x, [int(t) for t in target], coordinate, nearest)


def logical_not(im: Any, node: Any) -> SymbolVar | np.ndarray:
    source = _static_or_var(im, node.input[0])
    return np.logical_not(source) if isinstance(source, np.ndarray) else opr.LogicalNot.make(source)


def static_only(op_type: str, fn):
    def convert(im: Any, node: Any) -> np.ndarray:
        if not all(n in im.static for n in node.input):
            raise im.fail(f"{op_type} is supported on constants (shape arithmetic) only")
        return np.asarray(fn(*[im.static[n] for n in node.input]))

    return convert

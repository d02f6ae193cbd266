"""ONNX lowerings for the operators of today's small models (engine/opr/activation.py,
normalization.py, depthwise.py, resize.py, BatchedMatrixMul) and their gradients.

Each follows the engine operator's definition (its graph op, not its kernel): layer norm and its
gradient are the reductions the operator's docstring writes; activation gradients are the
elementwise formulas beside each operator; depthwise convolution gradients are the grouped
convolution gradients of gradients.py with one group per input channel; nearest resizing's
gradient sums each output back onto the pixel it copied, as two products with 0/1 matrices.
"""

from __future__ import annotations

import numpy as np

from .. import opr
from ..compiler.program import Node
from ..opr.activation import _INV_SQRT2
from ..opr.resize import source_index
from .gradients import conv_data_grad, conv_filter_grad
from .lowerings import Lowerer, lowering


def _c(lw: Lowerer, value: float, dtype: np.dtype) -> str:
    return lw.constant(np.asarray(value, dtype))


# ----- forward operators whose inference emitter reads SymbolVar-only attributes -----


@lowering(opr.BatchedMatrixMul)
def _batched_matmul(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    flags = (node.op.attrs["transpose_a"], node.op.attrs["transpose_b"])
    operands = []
    for name, source, flag in zip(ins, node.inputs, flags):
        rank = len(source.shape)
        perm = [*range(rank - 2), rank - 1, rank - 2]
        operands.append(lw.op("Transpose", [name], perm=perm) if flag else name)
    lw.add("MatMul", operands, out)


def _normalized(lw: Lowerer, node: Node, x: str) -> tuple[list[int], str, str]:
    """(axes, x - mean, 1 / sqrt(var + eps)) over the normalized axes, as normalization.py computes them."""
    source = node.inputs[0]
    rank = len(source.shape)
    axes = list(range(node.op.attrs["axis"] % rank, rank))
    dtype = source.dtype
    centered = lw.op("Sub", [x, lw.op("ReduceMean", [x], axes=axes, keepdims=1)])
    var = lw.op("ReduceMean", [lw.op("Mul", [centered, centered])], axes=axes, keepdims=1)
    root = lw.op("Sqrt", [lw.op("Add", [var, _c(lw, node.op.attrs["eps"], dtype)])])
    return axes, centered, lw.op("Div", [_c(lw, 1.0, dtype), root])


@lowering(opr.LayerNorm)
def _layer_norm(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    _, centered, rstd = _normalized(lw, node, ins[0])
    lw.add("Mul", [centered, rstd], out)


@lowering(opr.LayerNormGrad)
def _layer_norm_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """rstd * (g - mean(g) - xhat * mean(g * xhat)) over the normalized axes."""
    axes, centered, rstd = _normalized(lw, node, ins[0])
    g = ins[1]
    xhat = lw.op("Mul", [centered, rstd])
    mean_g = lw.op("ReduceMean", [g], axes=axes, keepdims=1)
    mean_gx = lw.op("ReduceMean", [lw.op("Mul", [g, xhat])], axes=axes, keepdims=1)
    inner = lw.op("Sub", [lw.op("Sub", [g, mean_g]), lw.op("Mul", [xhat, mean_gx])])
    lw.add("Mul", [rstd, inner], out)


# ----- activation gradients -----


@lowering(opr.GeluGrad)
def _gelu_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """dout * (Phi(x) + x * phi(x))."""
    x, dout = ins
    dtype = node.dtype
    erf = lw.op("Erf", [lw.op("Mul", [x, _c(lw, _INV_SQRT2, dtype)])])
    cdf = lw.op("Mul", [lw.op("Add", [erf, _c(lw, 1, dtype)]), _c(lw, 0.5, dtype)])
    gauss = lw.op("Exp", [lw.op("Mul", [lw.op("Mul", [x, x]), _c(lw, -0.5, dtype)])])
    pdf = lw.op("Mul", [gauss, _c(lw, 1 / np.sqrt(2 * np.pi), dtype)])
    lw.add("Mul", [dout, lw.op("Add", [cdf, lw.op("Mul", [x, pdf])])], out)


@lowering(opr.SiluGrad)
def _silu_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """dout * s * (1 + x * (1 - s)), s = sigmoid(x)."""
    x, dout = ins
    one = _c(lw, 1, node.dtype)
    s = lw.op("Sigmoid", [x])
    slope = lw.op("Add", [one, lw.op("Mul", [x, lw.op("Sub", [one, s])])])
    lw.add("Mul", [lw.op("Mul", [dout, s]), slope], out)


@lowering(opr.ClipGrad)
def _clip_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """dout where low < x < high (strictly: nothing flows at the bounds), else 0."""
    x, dout = ins
    dtype = node.inputs[0].dtype
    inside = None
    for bound, compare in ((node.op.attrs["low"], "Greater"), (node.op.attrs["high"], "Less")):
        if bound is not None:
            test = lw.op(compare, [x, _c(lw, bound, dtype)])
            inside = test if inside is None else lw.op("And", [inside, test])
    if inside is None:
        lw.add("Identity", [dout], out)
        return
    lw.add("Where", [inside, dout, _c(lw, 0, node.dtype)], out)


@lowering(opr.HardGrad)
def _hard_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """Hard sigmoid: alpha where 0 < alpha*x + beta < 1; hard swish: 0 up to -3, x/3 + 1/2, 1 from +3."""
    x, dout = ins
    a, dtype = node.op.attrs, node.dtype
    zero = _c(lw, 0, dtype)
    if not a["swish"]:
        t = lw.op("Add", [lw.op("Mul", [x, _c(lw, a["alpha"], dtype)]), _c(lw, a["beta"], dtype)])
        ramp = lw.op("And", [lw.op("Greater", [t, zero]), lw.op("Less", [t, _c(lw, 1, dtype)])])
        slope = lw.op("Where", [ramp, _c(lw, a["alpha"], dtype), zero])
    else:
        middle = lw.op("Add", [lw.op("Div", [x, _c(lw, 3, dtype)]), _c(lw, 0.5, dtype)])
        upper = lw.op("Where", [lw.op("Less", [x, _c(lw, 3, dtype)]), middle, _c(lw, 1, dtype)])
        slope = lw.op("Where", [lw.op("LessOrEqual", [x, _c(lw, -3, dtype)]), zero, upper])
    lw.add("Mul", [dout, slope], out)


# ----- depthwise convolution: a grouped convolution with one group per input channel -----


@lowering(opr.DepthwiseBackwardData)
def _depthwise_data_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    conv_data_grad(lw, node, ins, out, groups=lw.static(node, node.inputs[2].shape[1])[0])


@lowering(opr.DepthwiseBackwardFilter)
def _depthwise_filter_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    conv_filter_grad(lw, node, ins, out, lw.static(node, node.inputs[0].shape[1])[0])


# ----- nearest resizing -----


@lowering(opr.ResizeNearestGrad)
def _resize_nearest_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """out = Rᵀ-rows @ dout @ C-columns: R[i, r] = 1 where output row r copied input row i."""
    dout, like = node.inputs
    h, w = lw.static(node, *like.shape[2:])
    oh, ow = dout.shape[2:]
    a = node.op.attrs
    rows = source_index(oh, h, a["coordinate"], a["nearest"])
    cols = source_index(ow, w, a["coordinate"], a["nearest"])
    gather_rows = (np.arange(h)[:, None] == rows[None, :]).astype(dout.dtype)  # (H, OH)
    gather_cols = (cols[:, None] == np.arange(w)[None, :]).astype(dout.dtype)  # (OW, W)
    by_row = lw.op("MatMul", [lw.constant(gather_rows, "resize_rows"), ins[0]])
    lw.add("MatMul", [by_row, lw.constant(gather_cols, "resize_cols")], out)

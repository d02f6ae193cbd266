"""ONNX lowerings of the operators autodiff and the losses add: the backward pass in standard operators.

Convolution gradients are convolutions (data: ConvTranspose of dout with W; filter: Conv of
the input with dout as the filters, batch and channel axes swapped); max-pooling routes
dout through MaxPool's Indices with a scatter-add; average pooling spreads it with a
ConvTranspose of ones; softmax cross-entropy is (onehot - softmax) * d in closed form.
Dropout reads its keep-mask from an input (`dropout_mask/<k>`) so a step is deterministic.
"""

from __future__ import annotations

import numpy as np

from .. import opr
from ..compiler.program import Node
from .lowerings import Lowerer, lowering


def _transposed_conv_extra(lw: Lowerer, node: Node, sizes, outs, kernels, strides, pads, dilations) -> list[int]:
    """Rows/columns past the last window, which a ConvTranspose adds as output_padding."""
    sizes = lw.static(node, *sizes)
    return [
        size + 2 * p - ((o - 1) * s + d * (k - 1) + 1)
        for size, o, k, s, p, d in zip(sizes, outs, kernels, strides, pads, dilations)
    ]


@lowering(opr.ConvolutionBackwardData)
def _conv_data_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    conv_data_grad(lw, node, ins, out, node.op.attrs["groups"])


def conv_data_grad(lw: Lowerer, node: Node, ins: list[str], out: str, groups: int) -> None:
    """dx = ConvTranspose(dout, W): the transpose of the forward convolution, same geometry.
    Node inputs (W, dout, x-like); also depthwise convolution's (groups = input channels)."""
    w, dout, like = node.inputs
    a = node.op.attrs
    kernel = list(w.shape[2:])
    extra = _transposed_conv_extra(
        lw, node, like.shape[2:], dout.shape[2:], kernel, a["stride"], a["padding"], a["dilation"]
    )
    lw.add(
        "ConvTranspose",
        [ins[1], ins[0]],
        out,
        kernel_shape=kernel,
        strides=a["stride"],
        pads=a["padding"] * 2,
        dilations=a["dilation"],
        group=groups,
        output_padding=extra,
    )


@lowering(opr.ConvolutionBackwardFilter)
def _conv_filter_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    conv_filter_grad(lw, node, ins, out, node.op.attrs["groups"])


def conv_filter_grad(lw: Lowerer, node: Node, ins: list[str], out: str, g: int) -> None:
    """Node inputs (x, dout, W-like); also depthwise convolution's (g = input channels).

    dW[o, c, i, j] = sum over n, y, x of dout[n, o, y, x] * x_padded[n, c, y*s + i*d, x*s + j*d]:
    a Conv of the input (channels as the batch, samples as channels) with dout (samples as
    channels) as the filters, forward stride and dilation swapped; groups stay groups."""
    x, dout, like = node.inputs
    a = node.op.attrs
    o, cg, kh, kw = like.shape
    c, h, w = lw.static(node, *x.shape[1:])
    oh, ow = dout.shape[2:]
    if g == 1:
        data = lw.op("Transpose", [ins[0]], perm=[1, 0, 2, 3])  # (C, N, H, W)
        filters = lw.op("Transpose", [ins[1]], perm=[1, 0, 2, 3])  # (O, N, OH, OW)
    else:  # group k's input channels are the samples of x's channel group k
        grouped = lw.op("Reshape", [ins[0], lw.ints([-1, g, cg, h, w])])
        data = lw.op("Transpose", [grouped], perm=[2, 1, 0, 3, 4])  # (Cg, G, N, H, W)
        data = lw.op("Reshape", [data, lw.ints([cg, -1, h, w])])  # (Cg, G*N, H, W)
        grouped = lw.op("Reshape", [ins[1], lw.ints([-1, g, o // g, oh, ow])])
        filters = lw.op("Transpose", [grouped], perm=[1, 2, 0, 3, 4])  # (G, O/G, N, OH, OW)
        filters = lw.op("Reshape", [filters, lw.ints([o, -1, oh, ow])])  # (O, N, OH, OW)
    grads = lw.op(
        "Conv",
        [data, filters],
        kernel_shape=[oh, ow],
        strides=a["dilation"],
        dilations=a["stride"],
        pads=a["padding"] * 2,
        group=g,
    )  # (Cg, O, KH', KW'), KH' >= KH when the last window leaves rows over
    (ph, pw), (sh, sw), (dh, dw) = a["padding"], a["stride"], a["dilation"]
    if (h + 2 * ph - sh * (oh - 1) - 1) // dh + 1 > kh or (w + 2 * pw - sw * (ow - 1) - 1) // dw + 1 > kw:
        grads = lw.op("Slice", [grads, lw.ints([0, 0]), lw.ints([kh, kw]), lw.ints([2, 3])])
    lw.add("Transpose", [grads], out, perm=[1, 0, 2, 3])


@lowering(opr.PoolingBackward)
def _pooling_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    x, dout = node.inputs
    a = node.op.attrs
    geometry = dict(kernel_shape=a["window"], strides=a["stride"], pads=a["padding"] * 2)
    if a["mode"] == "max":
        # each window's (first) maximum by its flat index into x; overlapping windows add up
        indices = lw.fresh("MaxPool_indices")
        lw.add("MaxPool", [ins[0]], [lw.fresh("MaxPool_values"), indices], **geometry)
        flat = lw.ints([-1])
        zeros = lw.op("Reshape", [lw.zeros(ins[0], x.shape, dout.dtype), flat])
        routed = lw.op(
            "ScatterElements",
            [zeros, lw.op("Reshape", [indices, flat]), lw.op("Reshape", [ins[1], flat])],
            axis=0,
            reduction="add",
        )
        lw.add("Reshape", [routed, lw.shape_of(ins[0], x.shape)], out)
        return
    # average: each output's share (dout / window size, or / the real elements it counted),
    # spread back over its window by a depthwise ConvTranspose with a kernel of ones
    c = lw.static(node, x.shape[1])[0]
    h, w = lw.static(node, *x.shape[2:])
    oh, ow = dout.shape[2:]
    if a["mode"] == "average":
        count = np.asarray(a["window"][0] * a["window"][1], dout.dtype)
    else:
        count = node.op._counts(h, w, oh, ow, dout.dtype)
    share = lw.op("Div", [ins[1], lw.constant(count)])
    ones = lw.constant(np.ones((c, 1, *a["window"]), dout.dtype), "ones")
    extra = _transposed_conv_extra(lw, node, (h, w), (oh, ow), a["window"], a["stride"], a["padding"], (1, 1))
    lw.add("ConvTranspose", [share, ones], out, group=c, output_padding=extra, **geometry)


@lowering(opr.ReluGrad)
def _relu_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    y, dout = node.inputs
    zero = lw.constant(np.zeros((), dout.dtype))
    lw.add("Where", [lw.op("Greater", [ins[0], lw.constant(np.zeros((), y.dtype))]), ins[1], zero], out)


# ----- classification -----


def _one_hot(lw: Lowerer, labels: str, classes: int, dtype: np.dtype, axis: int) -> str:
    values = lw.constant(np.asarray([0, 1], dtype))
    return lw.op("OneHot", [labels, lw.constant(np.asarray(classes, np.int64)), values], axis=axis)


@lowering(opr.IndexingOneHot)
def _indexing_one_hot(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    axis = lw.ints([node.op.attrs["axis"]])
    picked = lw.op("GatherElements", [ins[0], lw.op("Unsqueeze", [ins[1], axis])], axis=node.op.attrs["axis"])
    lw.add("Squeeze", [picked, axis], out)


@lowering(opr.IndexingOneHotGrad)
def _indexing_one_hot_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    dout, _, x = node.inputs
    axis = lw.ints([node.op.attrs["axis"]])
    zeros = lw.zeros(ins[2], x.shape, dout.dtype)
    updates = [lw.op("Unsqueeze", [ins[1], axis]), lw.op("Unsqueeze", [ins[0], axis])]
    lw.add("ScatterElements", [zeros, *updates], out, axis=node.op.attrs["axis"])


@lowering(opr.SoftmaxCrossEntropy)
def _softmax_cross_entropy(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    axis = node.op.attrs["axis"]
    log_p = lw.op("LogSoftmax", [ins[0]], axis=axis)
    index = lw.op("Unsqueeze", [ins[1], lw.ints([axis])])
    picked = lw.op("Squeeze", [lw.op("GatherElements", [log_p, index], axis=axis), lw.ints([axis])])
    lw.add("Neg", [picked], out)


@lowering(opr.SoftmaxCrossEntropyGrad)
def _softmax_cross_entropy_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """(onehot(label) - softmax) * d, as the kernel computes it: -(softmax * d) + onehot * d."""
    log_p = node.inputs[0]
    axis = node.op.attrs["axis"] % len(log_p.shape)
    classes = lw.static(node, log_p.shape[axis])[0]
    d = lw.op("Unsqueeze", [ins[2], lw.ints([axis])])
    minus = lw.op("Neg", [lw.op("Mul", [lw.op("Exp", [ins[0]]), d])])
    hot = _one_hot(lw, ins[1], classes, log_p.dtype, axis)
    lw.add("Add", [minus, lw.op("Mul", [hot, d])], out)


@lowering(opr.OneHot)
def _one_hot_op(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    lw.add("Identity", [_one_hot(lw, ins[0], node.op.attrs["num_classes"], node.dtype, -1)], out)


@lowering(opr.EmbeddingLookupGrad)
def _embedding_grad(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """Scatter-add each looked-up row's gradient into zeros shaped like the table."""
    dout, _, weight = node.inputs
    rows, dim = weight.shape
    index = lw.op("Reshape", [ins[1], lw.ints([-1, 1])])
    updates = lw.op("Reshape", [ins[0], lw.ints([-1, dim])])
    zeros = lw.zeros(ins[2], weight.shape, dout.dtype)
    lw.add("ScatterND", [zeros, index, updates], out, reduction="add")


@lowering(opr.DropoutMask)
def _dropout_mask(lw: Lowerer, node: Node, ins: list[str], out: str) -> None:
    """The keep-mask (1 keep, 0 drop) is an input the caller draws; scaled by 1/(1-p) here."""
    p = node.op.attrs["p"]
    name = f"dropout_mask/{len(lw.extra_inputs)}"
    lw.extra_inputs.append((name, node.shape, node.dtype, {"p": p, "seed": node.op.attrs.get("seed", 0)}))
    lw.dtypes[name] = node.dtype
    lw.add("Mul", [name, lw.constant(np.asarray(1 / (1 - p), node.dtype))], out)

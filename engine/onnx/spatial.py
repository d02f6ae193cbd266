"""Conv and pooling from ONNX, including the padding the engine's operators don't take directly.

The engine pads symmetrically (`padding=(ph, pw)`). ONNX also has asymmetric `pads`
([top, left, bottom, right]), `auto_pad=SAME_*` and pooling's `ceil_mode` (a last, partial window).
All three become: the symmetric part as the operator's padding, the rest as explicit blocks
concatenated around the input (zeros for Conv and AveragePool, -inf for MaxPool). AveragePool then
rescales each output by window size / counted elements, computed at import from the static sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import opr
from ..graph import SymbolVar
from ..opr.elemwise import BroadcastLike
from ..opr.shape import Slice


def _geometry(im: Any, x: SymbolVar, kernel: list[int], a: dict, ceil_mode: bool = False) -> tuple[list, list]:
    """(begin, end) padding per spatial axis; `end` includes the extra rows a ceil-mode window needs."""
    strides = list(a.get("strides", [1, 1]))
    dilations = list(a.get("dilations", [1, 1]))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    sizes = x.shape[2:]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if None in sizes:
            raise im.fail(f"auto_pad={auto_pad} needs static spatial sizes, input is {x.shape}")
        begin, end = [], []
        for size, k, s, d in zip(sizes, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
    elif auto_pad in ("NOTSET", "VALID"):
        pads = list(a.get("pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
        if len(pads) != 4:
            raise im.fail(f"only 2-D padding is supported, got pads={pads}")
        begin, end = pads[:2], pads[2:]
    else:
        raise im.fail(f"auto_pad={auto_pad!r} is not supported")
    if ceil_mode:
        for i, (size, k, s) in enumerate(zip(sizes, kernel, strides)):
            if size is None:
                raise im.fail(f"ceil_mode=1 needs static spatial sizes, input is {x.shape}")
            padded = size + begin[i] + end[i]
            out = math.ceil((padded - k) / s) + 1
            if (out - 1) * s >= size + begin[i]:  # the last window must start inside the input (PyTorch, ONNX)
                out -= 1
            end[i] += max((out - 1) * s + k - padded, 0)
    return begin, end


def pad(x: SymbolVar, begin: list[int], end: list[int], value: float) -> SymbolVar:
    """`x` (NCHW) with constant blocks of `value` before/after each spatial axis; gradients pass to `x`."""
    for axis, before, after in zip((2, 3), begin, end):
        parts = []
        for size in (before, after):
            if size:
                block_shape = [1, 1, 1, 1]
                block_shape[axis] = size
                block = x.graph.constant(np.full(block_shape, value, x.dtype))
                parts.append(BroadcastLike.make(block, Slice.make(x, axis=axis, start=0, stop=1)))
            else:
                parts.append(None)
        if parts[0] is not None or parts[1] is not None:
            x = opr.concat([p for p in (parts[0], x, parts[1]) if p is not None], axis=axis)
    return x


def _split(begin: list[int], end: list[int], limit: list[int] | None = None) -> tuple[list, list, list]:
    """The symmetric padding the operator takes, and what remains to pad explicitly."""
    sym = [min(b, e) for b, e in zip(begin, end)]
    if limit is not None:
        sym = [min(p, k // 2) for p, k in zip(sym, limit)]
    return sym, [b - p for b, p in zip(begin, sym)], [e - p for e, p in zip(end, sym)]


def conv(im: Any, node: Any) -> SymbolVar:
    a = im.attrs()
    x, w = im.var(node.input[0]), im.var(node.input[1])
    if x.ndim == 3 and w.ndim == 3:  # 1-D: the 2-D convolution over (N, C, 1, L)
        pads = list(a.get("pads", [0, 0]))
        if pads[0] != pads[-1] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise im.fail(f"1-D convolution with asymmetric or automatic padding is not supported, pads={pads}")
        y = opr.conv1d(x, w, int(a.get("strides", [1])[0]), int(pads[0]), int(a.get("dilations", [1])[0]),
                       int(a.get("group", 1)))  # fmt: skip
        return y if len(node.input) < 3 or not node.input[2] else y + opr.reshape(im.var(node.input[2]), (1, -1, 1))
    if w.ndim != 4 or x.ndim != 4:
        raise im.fail(f"only 1-D and 2-D convolution are supported, input {x.shape}, weight {w.shape}")
    dilations = list(a.get("dilations", [1, 1]))
    begin, end = _geometry(im, x, [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilations)], {**a, "dilations": [1, 1]})
    sym, extra_begin, extra_end = _split(begin, end)
    x = pad(x, extra_begin, extra_end, 0.0)
    y = opr.convolution(x, w, stride=a.get("strides", 1), padding=sym, dilation=dilations, groups=a.get("group", 1))
    if len(node.input) > 2 and node.input[2]:
        y = y + opr.reshape(im.var(node.input[2]), (1, -1, 1, 1))
    return y


def pool(mode: str):
    def convert(im: Any, node: Any) -> SymbolVar:
        a = im.attrs()
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise im.fail("pooling dilations are not supported")
        if len(node.output) > 1 and node.output[1]:
            raise im.fail("the indices output of MaxPool is not supported")
        x = im.var(node.input[0])
        if x.ndim != 4:
            raise im.fail(f"only 2-D pooling is supported, input {x.shape}")
        kernel, strides = list(a["kernel_shape"]), list(a.get("strides", [1, 1]))
        begin, end = _geometry(im, x, kernel, a, ceil_mode=bool(a.get("ceil_mode", 0)))
        include_pad = bool(a.get("count_include_pad", 0))
        if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):  # the engine's own padding
            kind = "max" if mode == "max" else ("average" if include_pad else "average_count_exclude_padding")
            return opr.pooling(x, kind, window=kernel, stride=strides, padding=begin)
        if mode == "max":
            sym, extra_begin, extra_end = _split(begin, end, kernel)
            return opr.pooling(
                pad(x, extra_begin, extra_end, -np.inf), "max", window=kernel, stride=strides, padding=sym
            )
        y = opr.pooling(pad(x, begin, end, 0.0), "average", window=kernel, stride=strides)
        declared_end = _geometry(im, x, kernel, a)[1]
        scale = _average_scale(im, x, kernel, strides, begin, end, declared_end, include_pad)
        return y if scale is None else y * x.graph.constant(scale)

    return convert


def _average_scale(
    im: Any,
    x: SymbolVar,
    kernel: list[int],
    strides: list[int],
    begin: list[int],
    end: list[int],
    declared_end: list[int],
    include_pad: bool,
) -> np.ndarray | None:
    """window size / counted elements per output: padding counts only with count_include_pad, and
    the ceil-mode extension never does."""
    if None in x.shape[2:]:
        raise im.fail(f"asymmetric or ceil-mode average pooling needs static spatial sizes, input is {x.shape}")
    counted = np.zeros([s + b + e for s, b, e in zip(x.shape[2:], begin, end)], np.float64)
    if include_pad:  # the declared pads count, the ceil-mode extension beyond them does not
        counted[: begin[0] + x.shape[2] + declared_end[0], : begin[1] + x.shape[3] + declared_end[1]] = 1
    else:
        counted[begin[0] : begin[0] + x.shape[2], begin[1] : begin[1] + x.shape[3]] = 1
    oh, ow = ((n - k) // s + 1 for n, k, s in zip(counted.shape, kernel, strides))
    counts = np.array(
        [
            [
                counted[i * strides[0] : i * strides[0] + kernel[0], j * strides[1] : j * strides[1] + kernel[1]].sum()
                for j in range(ow)
            ]
            for i in range(oh)
        ]
    )
    scale = kernel[0] * kernel[1] / counts
    return None if np.all(scale == 1) else scale.astype(x.dtype).reshape(1, 1, oh, ow)


def pad_op(im: Any, node: Any) -> SymbolVar:
    """ONNX Pad, constant mode, on the spatial axes of NCHW (ZeroPad2d, Conv2d(padding='same'))."""
    a = im.attrs()
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if len(node.input) > 1 and node.input[1]:  # opset >= 11: pads, constant_value, axes as inputs
        pads = [int(p) for p in im.constant_input(node.input[1], "the Pad pads")]
        value = (
            float(im.constant_input(node.input[2], "the Pad value")) if len(node.input) > 2 and node.input[2] else 0.0
        )
        if len(node.input) > 3 and node.input[3]:
            raise im.fail("Pad with an axes input is not supported")
    else:
        pads, value = list(a.get("pads", [])), float(a.get("value", 0.0))
    x = im.var(node.input[0])
    if mode != "constant" or x.ndim != 4 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        raise im.fail(
            f"Pad is supported in constant mode with non-negative pads on the spatial axes of a "
            f"4-D input, got mode={mode!r}, pads={pads}, input {x.shape}"
        )
    return pad(x, pads[2:4], pads[6:8], value)

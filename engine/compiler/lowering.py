"""Lowering that exposes work two kernels would otherwise each repeat.

`share_im2col`: a convolution and its filter gradient both build the same column buffer
from the same input. Split both at that buffer, so one Im2Col node feeds the forward product
and the filter gradient (the memory plan keeps the buffer alive between them). The kernels
are the very ones the unsplit operators run, so results are bit for bit the same.
"""

from __future__ import annotations

from ..opr.conv import Convolution, ConvolutionBackwardFilter
from ..opr.conv_cols import ConvolutionFromCols, FilterGradFromCols, Im2Col
from .program import Node, Program

_GEOMETRY = ("stride", "padding", "dilation", "groups")


def share_im2col(program: Program) -> None:
    forwards: dict[tuple, Node] = {}
    for node in program.nodes:
        if isinstance(node.op, Convolution):
            x, w = node.inputs
            forwards[_key(x, w.shape[2:], node.op)] = node
    mapping: dict[int, Node] = {}
    for node in program.nodes:
        if not isinstance(node.op, ConvolutionBackwardFilter):
            continue
        x, dout, like = node.inputs
        forward = forwards.get(_key(x, like.shape[2:], node.op))
        if forward is None or None in x.shape[1:] or id(forward) in mapping:
            continue
        geometry = {k: node.op.attrs[k] for k in _GEOMETRY}
        n, c, h, w_ = x.shape
        kh, kw = like.shape[2:]
        im2col = Im2Col(kernel=[kh, kw], **geometry)
        oh, ow = im2col.out_hw(h, w_, kh, kw)
        g = geometry["groups"]
        cols = Node(im2col, [x], (n, g, c // g * kh * kw, oh * ow), x.dtype)
        mapping[id(forward)] = Node(
            ConvolutionFromCols(out_hw=[oh, ow], **geometry),
            [cols, forward.inputs[1]],
            forward.shape,
            forward.dtype,
            origin=forward.origin,
        )
        mapping[id(node)] = Node(
            FilterGradFromCols(**geometry), [cols, dout, like], node.shape, node.dtype, origin=node.origin
        )
    program.replace(mapping)
    if mapping:
        program.notes.append(
            f"share_im2col: {len(mapping) // 2} convolution(s) share columns with their filter gradient"
        )


def _key(x: Node, kernel: tuple, op) -> tuple:
    return (id(x), tuple(kernel), *(repr(op.attrs[k]) for k in _GEOMETRY))

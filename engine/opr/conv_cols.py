"""The column form the compiler lowers a convolution to (compiler/lowering.py): one Im2Col buffer
shared by the forward product and the filter gradient. Made by the compiler, never added to graphs."""

from __future__ import annotations

import numpy as np

from .base import Operator, ShapeError, Workspace
from .conv import ConvGeometry, conv_from_cols, filter_grad_from_cols


class Im2Col(ConvGeometry):
    """The column buffer of a convolution, (N, G, Cg*KH*KW, OH*OW); made by the compiler's
    share_im2col pass when a convolution and its filter gradient read the same input."""

    n_inputs = 1

    def infer(self, x):
        raise ShapeError("Im2Col is made by the compiler, not added to graphs")

    def forward(self, x):
        n, c, h, w = x.shape
        oh, ow = self.out_hw(h, w, *self.kernel)
        g = self.groups
        out = np.empty((n, g, c // g * self.kernel[0] * self.kernel[1], oh * ow), x.dtype)
        self.forward_into(Workspace(), out, x)
        return out

    def forward_into(self, ws, out, x):
        self.bind(ws, out, x)(x)

    def bind(self, ws, out, x):
        kh, kw = self.kernel
        windows_of = self._windows(ws, x, kh, kw)
        cols = out.reshape(x.shape[:2] + (kh, kw) + self.out_hw(*x.shape[2:], kh, kw))

        def run(x):
            np.copyto(cols, windows_of(x))

        return run


class ConvolutionFromCols(Operator):
    """Convolution given its column buffer: one matrix product per sample and group."""

    n_inputs = 2

    def infer(self, cols, w):
        raise ShapeError("ConvolutionFromCols is made by the compiler, not added to graphs")

    def forward(self, cols, w):
        out = np.empty((cols.shape[0], w.shape[0], *self.out_hw), np.result_type(cols, w))
        self.forward_into(None, out, cols, w)
        return out

    def forward_into(self, ws, out, cols, w):
        conv_from_cols(out, w, self.groups)(cols, w)

    def bind(self, ws, out, cols, w):
        product = conv_from_cols(out, w, self.groups)
        return product


class FilterGradFromCols(Operator):
    """ConvolutionBackwardFilter given the forward's column buffer; `like` is the weight."""

    n_inputs = 3

    def infer(self, cols, dout, like):
        raise ShapeError("FilterGradFromCols is made by the compiler, not added to graphs")

    def forward(self, cols, dout, like):
        out = np.empty(like.shape, dout.dtype)
        self.forward_into(Workspace(), out, cols, dout, like)
        return out

    def forward_into(self, ws, out, cols, dout, like):
        filter_grad_from_cols(ws, out, cols, dout, self.groups)(cols, dout)

    def bind(self, ws, out, cols, dout, like):
        product = filter_grad_from_cols(ws, out, cols, dout, self.groups)

        def run(cols, dout, like):
            product(cols, dout)

        return run

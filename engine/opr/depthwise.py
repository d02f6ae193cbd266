"""Depthwise 2-D convolution: each output channel filters one input channel (groups == input
channels, MobileNet's 3x3 stage). Weight (C*m, 1, KH, KW); output channel o reads input
channel o // m (m, the depth multiplier, is 1 in MobileNetV2).

A depthwise convolution has K*K multiply-adds per output and no reduction over channels, so
im2col + BLAS (conv.py) would copy K*K times the input for a product of inner size K*K. These
kernels instead loop over the K*K window taps (9 for 3x3), each one vectorized multiply-add
over the whole batch through a strided view of the padded input. Both gradients are taps too.
"""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator, Workspace, shape_str
from .conv import _pair, out_size


class _DepthwiseGeometry(Operator):
    @classmethod
    def make(cls, *inputs, stride=1, padding=0, dilation=1, name=None):
        return super().make(*inputs, stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), name=name)

    def out_hw(self, h, w, kh, kw):
        return (
            out_size(h, kh, self.stride[0], self.padding[0], self.dilation[0]),
            out_size(w, kw, self.stride[1], self.padding[1], self.dilation[1]),
        )

    def _tap(self, xp: np.ndarray, i: int, j: int, oh: int, ow: int) -> np.ndarray:
        """The (N, C, OH, OW) view of padded input `xp` that window tap (i, j) reads."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return xp[:, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]

    def _padded(self, ws: Workspace, x: np.ndarray, multiplier: int) -> np.ndarray:
        """x zero-padded, its channels repeated `multiplier` times (output channel order)."""
        ph, pw = self.padding
        n, c, h, w = x.shape
        if not (ph or pw) and multiplier == 1:
            return x
        xp = ws.get("padded", (n, c * multiplier, h + 2 * ph, w + 2 * pw), x.dtype, zero=True)
        xp[:, :, ph : ph + h, pw : pw + w] = np.repeat(x, multiplier, axis=1) if multiplier > 1 else x
        return xp


class DepthwiseConvolution(_DepthwiseGeometry):
    n_inputs = 2

    def infer(self, x, w):
        if x.ndim != 4 or w.ndim != 4 or w.shape[1] != 1:
            raise ShapeError(
                f"DepthwiseConvolution: input {shape_str(x.shape)} must be NCHW and weight "
                f"{shape_str(w.shape)} (channels * multiplier, 1, kh, kw)"
            )
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        if c is None or o % c:
            raise ShapeError(
                f"DepthwiseConvolution: weight {shape_str(w.shape)} needs a multiple of the input's "
                f"{c} channels (input {shape_str(x.shape)})"
            )
        if min(self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ShapeError(f"DepthwiseConvolution: stride/dilation must be >= 1 and padding >= 0, got {self.attrs}")
        oh, ow = self.out_hw(h, wd, kh, kw)
        if (oh is not None and oh < 1) or (ow is not None and ow < 1):
            raise ShapeError(
                f"DepthwiseConvolution: kernel {kh}x{kw} does not fit input {shape_str(x.shape)} "
                f"with padding {self.padding}"
            )
        return (n, o, oh, ow), np.result_type(x.dtype, w.dtype)

    def forward(self, x, w):
        oh, ow = self.out_hw(*x.shape[2:], *w.shape[2:])
        out = np.empty((x.shape[0], w.shape[0], oh, ow), np.result_type(x, w))
        self.forward_into(Workspace(), out, x, w)
        return out

    def forward_into(self, ws, out, x, w):
        o, _, kh, kw = w.shape
        xp = self._padded(ws, x, o // x.shape[1])
        oh, ow = out.shape[2:]
        product = ws.get("product", out.shape, out.dtype)
        out.fill(0)
        for i in range(kh):
            for j in range(kw):
                np.multiply(self._tap(xp, i, j, oh, ow), w[:, 0, i, j].reshape(1, o, 1, 1), out=product)
                np.add(out, product, out=out)

    def grad(self, out, dout):
        x, w = out.inputs
        geometry = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        return [
            DepthwiseBackwardData.make(w, dout, x, **geometry),
            DepthwiseBackwardFilter.make(x, dout, w, **geometry),
        ]


class DepthwiseBackwardData(_DepthwiseGeometry):
    """dL/dx: each tap adds dout * its weight back onto the padded input positions it read."""

    n_inputs = 3

    def infer(self, w, dout, like):
        return like.shape, dout.dtype

    def forward(self, w, dout, like):
        out = np.empty(like.shape, dout.dtype)
        self.forward_into(Workspace(), out, w, dout, like)
        return out

    def forward_into(self, ws, out, w, dout, like):
        n, c, h, wd = like.shape
        o, _, kh, kw = w.shape
        (ph, pw), (oh, ow) = self.padding, dout.shape[2:]
        dxp = ws.get("dx_padded", (n, o, h + 2 * ph, wd + 2 * pw), dout.dtype)
        dxp.fill(0)
        product = ws.get("product", dout.shape, dout.dtype)
        for i in range(kh):
            for j in range(kw):
                tap = self._tap(dxp, i, j, oh, ow)
                np.multiply(dout, w[:, 0, i, j].reshape(1, o, 1, 1), out=product)
                np.add(tap, product, out=tap)
        inner = dxp[:, :, ph : ph + h, pw : pw + wd]
        if o == c:
            np.copyto(out, inner)
        else:  # output channels c*m .. c*m+m-1 all read input channel c
            np.sum(inner.reshape(n, c, o // c, h, wd), axis=2, out=out)


class DepthwiseBackwardFilter(_DepthwiseGeometry):
    """dL/dw[o, 0, i, j] = sum over batch and positions of dout[:, o] * tap(i, j)[:, o]."""

    n_inputs = 3

    def infer(self, x, dout, like):
        return like.shape, dout.dtype

    def forward(self, x, dout, like):
        out = np.empty(like.shape, dout.dtype)
        self.forward_into(Workspace(), out, x, dout, like)
        return out

    def forward_into(self, ws, out, x, dout, like):
        o, _, kh, kw = like.shape
        xp = self._padded(ws, x, o // x.shape[1])
        oh, ow = dout.shape[2:]
        product = ws.get("product", dout.shape, dout.dtype)
        for i in range(kh):
            for j in range(kw):
                np.multiply(self._tap(xp, i, j, oh, ow), dout, out=product)
                np.sum(product, axis=(0, 2, 3), out=out[:, 0, i, j])

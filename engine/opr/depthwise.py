"""Depthwise 2-D convolution: each output channel filters one input channel (groups == input
channels, MobileNet's 3x3 stage). Weight (C*m, 1, KH, KW); output channel o reads input
channel o // m (m, the depth multiplier, is 1 in MobileNetV2).

A depthwise convolution has K*K multiply-adds per output and no reduction over channels, so
im2col + BLAS (conv.py) would copy K*K times the input for a product of inner size K*K. These
kernels instead loop over the K*K window taps (9 for 3x3), each one vectorized multiply-add
over the whole batch. They work batch-last, (C, H, W, N): a tap's view then runs over rows of
W*N contiguous values (N at least), where NCHW would give short rows of W.
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
        """The (C, OH, OW, N) view of the batch-last padded input `xp` that window tap (i, j) reads."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return xp[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]

    def _padded(self, ws: Workspace, x: np.ndarray, multiplier: int) -> np.ndarray:
        """x batch-last (C*m, H + 2ph, W + 2pw, N), zero borders, channels repeated m times."""
        ph, pw = self.padding
        n, c, h, w = x.shape
        xp = ws.get("padded", (c * multiplier, h + 2 * ph, w + 2 * pw, n), x.dtype, zero=True)
        source = x.transpose(1, 2, 3, 0)
        xp[:, ph : ph + h, pw : pw + w] = np.repeat(source, multiplier, axis=0) if multiplier > 1 else source
        return xp


def _column(w: np.ndarray, i: int, j: int) -> np.ndarray:
    return w[:, 0, i, j].reshape(-1, 1, 1, 1)


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
        n, _, oh, ow = out.shape
        acc = ws.get("acc", (o, oh, ow, n), out.dtype)
        product = ws.get("product", (o, oh, ow, n), out.dtype)
        for k in range(kh * kw):
            i, j = divmod(k, kw)
            if k == 0:
                np.multiply(self._tap(xp, i, j, oh, ow), _column(w, i, j), out=acc)
            else:
                np.multiply(self._tap(xp, i, j, oh, ow), _column(w, i, j), out=product)
                np.add(acc, product, out=acc)
        np.copyto(out, acc.transpose(3, 0, 1, 2))

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
        d = ws.get("dout", (o, oh, ow, n), dout.dtype)
        np.copyto(d, dout.transpose(1, 2, 3, 0))
        dxp = ws.get("dx_padded", (o, h + 2 * ph, wd + 2 * pw, n), dout.dtype)
        dxp.fill(0)
        product = ws.get("product", d.shape, dout.dtype)
        for i in range(kh):
            for j in range(kw):
                tap = self._tap(dxp, i, j, oh, ow)
                np.multiply(d, _column(w, i, j), out=product)
                np.add(tap, product, out=tap)
        inner = dxp[:, ph : ph + h, pw : pw + wd]  # (O, H, W, N)
        if o != c:  # output channels c*m .. c*m+m-1 all read input channel c
            inner = inner.reshape(c, o // c, h, wd, n).sum(axis=1)
        np.copyto(out, inner.transpose(3, 0, 1, 2))


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
        n, _, oh, ow = dout.shape
        d = ws.get("dout", (o, oh, ow, n), dout.dtype)
        np.copyto(d, dout.transpose(1, 2, 3, 0))
        product = ws.get("product", d.shape, dout.dtype)
        for i in range(kh):
            for j in range(kw):
                np.multiply(self._tap(xp, i, j, oh, ow), d, out=product)
                np.sum(product.reshape(o, -1), axis=1, out=out[:, 0, i, j])

"""2-D convolution (MegEngine's `opr::Convolution`), NCHW, with stride, padding, dilation, groups.

The kernel lowers the convolution to one batched matrix product per group over a strided
window view (im2col): no Python loop touches pixels. Its two gradients are operators of
their own, so the backward graph is as plain as the forward one.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..graph import ShapeError
from .base import Operator, same_size, shape_str


def _pair(v) -> list[int]:
    return [int(v), int(v)] if np.isscalar(v) else [int(v[0]), int(v[1])]


def out_size(size: int | None, kernel: int, stride: int, pad: int, dilation: int) -> int | None:
    if size is None:
        return None
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def windows(xp: np.ndarray, kernel, stride, dilation, out_hw) -> np.ndarray:
    """A read-only (N, C, OH, OW, KH, KW) view of the sliding windows of padded input `xp`."""
    n, c = xp.shape[:2]
    s0, s1, s2, s3 = xp.strides
    return as_strided(xp, (n, c, out_hw[0], out_hw[1], kernel[0], kernel[1]),
                      (s0, s1, s2 * stride[0], s3 * stride[1], s2 * dilation[0], s3 * dilation[1]),
                      writeable=False)


def pad_hw(x: np.ndarray, pad, value: float = 0.0) -> np.ndarray:
    if not any(pad):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])), constant_values=value)


class _ConvGeometry(Operator):
    """Shared attribute handling for the convolution family."""

    @classmethod
    def make(cls, *inputs, stride=1, padding=0, dilation=1, groups=1, name=None):
        return super().make(*inputs, stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation),
                            groups=int(groups), name=name)

    def out_hw(self, h, w, kh, kw):
        return (out_size(h, kh, self.stride[0], self.padding[0], self.dilation[0]),
                out_size(w, kw, self.stride[1], self.padding[1], self.dilation[1]))

    def _cols(self, x: np.ndarray, kh: int, kw: int) -> tuple[np.ndarray, tuple[int, int]]:
        """im2col: (G, N*OH*OW, Cg*KH*KW), contiguous, ready for one matmul per group."""
        n, c, h, w = x.shape
        oh, ow = self.out_hw(h, w, kh, kw)
        g = self.groups
        view = windows(pad_hw(x, self.padding), (kh, kw), self.stride, self.dilation, (oh, ow))
        view = view.reshape(n, g, c // g, oh, ow, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6)
        return view.reshape(g, n * oh * ow, (c // g) * kh * kw), (oh, ow)


class Convolution(_ConvGeometry):
    n_inputs = 2

    def infer(self, x, w):
        if x.ndim != 4 or w.ndim != 4:
            raise ShapeError(f"Convolution: input {shape_str(x.shape)} must be NCHW and weight "
                             f"{shape_str(w.shape)} must be (out, in/groups, kh, kw)")
        g = self.groups
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        if g < 1 or o % g or (c is not None and c % g):
            raise ShapeError(f"Convolution: groups={g} must divide input channels {c} and output channels {o}")
        if c is not None and not same_size(c // g, cg):
            raise ShapeError(f"Convolution: input {shape_str(x.shape)} has {c} channels but weight "
                             f"{shape_str(w.shape)} expects {cg * g} (groups={g})")
        oh, ow = self.out_hw(h, wd, kh, kw)
        if (oh is not None and oh < 1) or (ow is not None and ow < 1):
            raise ShapeError(f"Convolution: kernel {kh}x{kw} (dilation {self.dilation}) does not fit input "
                             f"{shape_str(x.shape)} with padding {self.padding}")
        if min(self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ShapeError(f"Convolution: stride/dilation must be >= 1 and padding >= 0, got "
                             f"{self.stride}/{self.dilation}/{self.padding}")
        return (n, o, oh, ow), np.result_type(x.dtype, w.dtype)

    def forward(self, x, w):
        o, cg, kh, kw = w.shape
        g, n = self.groups, x.shape[0]
        cols, (oh, ow) = self._cols(x, kh, kw)
        wg = w.reshape(g, o // g, cg * kh * kw)
        out = np.matmul(cols, wg.transpose(0, 2, 1))  # (G, N*OH*OW, O/G)
        return out.reshape(g, n, oh, ow, o // g).transpose(1, 0, 4, 2, 3).reshape(n, o, oh, ow)

    def grad(self, out, dout):
        x, w = out.inputs
        geometry = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return [ConvolutionBackwardData.make(w, dout, x, **geometry),
                ConvolutionBackwardFilter.make(x, dout, w, **geometry)]


def _dout_by_group(dout: np.ndarray, g: int) -> np.ndarray:
    """(N, O, OH, OW) -> (G, N*OH*OW, O/G)."""
    n, o, oh, ow = dout.shape
    return dout.reshape(n, g, o // g, oh, ow).transpose(1, 0, 3, 4, 2).reshape(g, n * oh * ow, o // g)


class ConvolutionBackwardData(_ConvGeometry):
    """dL/dx from the weight and dL/dout; `like` is the forward input (for its shape)."""

    n_inputs = 3

    def infer(self, w, dout, like):
        return like.shape, dout.dtype

    def forward(self, w, dout, like):
        o, cg, kh, kw = w.shape
        g = self.groups
        n, c, h, wd = like.shape
        oh, ow = dout.shape[2:]
        dcols = np.matmul(_dout_by_group(dout, g), w.reshape(g, o // g, cg * kh * kw))
        dcols = dcols.reshape(g, n, oh, ow, cg, kh, kw).transpose(1, 0, 4, 5, 6, 2, 3).reshape(n, c, kh, kw, oh, ow)
        ph, pw = self.padding
        dxp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), dtype=dout.dtype)
        (sh, sw), (dh, dw) = self.stride, self.dilation
        for i in range(kh):  # col2im: one strided add per kernel tap
            for j in range(kw):
                dxp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw] += dcols[:, :, i, j]
        return dxp[:, :, ph:ph + h, pw:pw + wd]


class ConvolutionBackwardFilter(_ConvGeometry):
    """dL/dw from the input and dL/dout; `like` is the weight (for its shape)."""

    n_inputs = 3

    def infer(self, x, dout, like):
        return like.shape, dout.dtype

    def forward(self, x, dout, like):
        o, cg, kh, kw = like.shape
        cols, _ = self._cols(x, kh, kw)  # (G, N*OH*OW, Cg*KH*KW)
        dw = np.matmul(_dout_by_group(dout, self.groups).transpose(0, 2, 1), cols)  # (G, O/G, Cg*KH*KW)
        return dw.reshape(o, cg, kh, kw)

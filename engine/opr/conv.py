"""2-D convolution (MegEngine's `opr::Convolution`), NCHW, with stride, padding, dilation, groups.

The kernels lower the convolution to BLAS matrix products over a strided window view
(im2col) copied into a column buffer kept between steps: no Python loop touches pixels.
Columns are laid out per sample, (N, G, Cg*KH*KW, OH*OW), so the product W @ cols lands
directly in NCHW order with no transpose. The two gradients are operators of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..graph import ShapeError
from .base import Operator, Workspace, same_size, shape_str


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
    return as_strided(
        xp,
        (n, c, out_hw[0], out_hw[1], kernel[0], kernel[1]),
        (s0, s1, s2 * stride[0], s3 * stride[1], s2 * dilation[0], s3 * dilation[1]),
        writeable=False,
    )


def pad_hw(x: np.ndarray, pad, value: float = 0.0) -> np.ndarray:
    if not any(pad):
        return x
    return np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])), constant_values=value)


class ConvGeometry(Operator):
    """Shared attribute handling and the column buffer of the convolution family."""

    @classmethod
    def make(cls, *inputs, stride=1, padding=0, dilation=1, groups=1, name=None):
        return super().make(
            *inputs,
            stride=_pair(stride),
            padding=_pair(padding),
            dilation=_pair(dilation),
            groups=int(groups),
            name=name,
        )

    def out_hw(self, h, w, kh, kw):
        return (
            out_size(h, kh, self.stride[0], self.padding[0], self.dilation[0]),
            out_size(w, kw, self.stride[1], self.padding[1], self.dilation[1]),
        )

    def _windows(self, ws: Workspace, x: np.ndarray, kh: int, kw: int) -> Callable[[np.ndarray], np.ndarray]:
        """For inputs shaped like `x`: a function giving the read-only (N, C, KH, KW, OH, OW) window
        view of the (zero-padded) input. With padding, the input is copied into a workspace buffer
        whose borders are zeroed once and the view over it is made once; without, the view of the
        last input is kept until another array comes."""
        n, c, h, w = x.shape
        oh, ow = self.out_hw(h, w, kh, kw)
        (sh, sw), (dh, dw), (ph, pw) = self.stride, self.dilation, self.padding

        def view_of(xp: np.ndarray) -> np.ndarray:
            s0, s1, s2, s3 = xp.strides
            shape, strides = (n, c, kh, kw, oh, ow), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw)
            return as_strided(xp, shape, strides, writeable=False)

        if ph or pw:
            xp = ws.get("padded", (n, c, h + 2 * ph, w + 2 * pw), x.dtype, zero=True)
            inner, view = xp[:, :, ph : ph + h, pw : pw + w], view_of(xp)

            def padded(x: np.ndarray) -> np.ndarray:
                np.copyto(inner, x)
                return view

            return padded
        last: list = [None, None]

        def direct(x: np.ndarray) -> np.ndarray:
            if x is not last[0]:
                last[:] = [x, view_of(x)]
            return last[1]

        return direct

    def _cols(self, ws: Workspace, x: np.ndarray, kh: int, kw: int) -> Callable[[np.ndarray], np.ndarray]:
        """For inputs shaped like `x`: a function doing im2col into the workspace, returning the
        (N, G, Cg*KH*KW, OH*OW) contiguous column buffer."""
        n, c, h, w = x.shape
        oh, ow = self.out_hw(h, w, kh, kw)
        windows_of = self._windows(ws, x, kh, kw)
        cols = ws.get("cols", (n, c, kh, kw, oh, ow), x.dtype)
        flat = cols.reshape(n, self.groups, (c // self.groups) * kh * kw, oh * ow)

        def im2col(x: np.ndarray) -> np.ndarray:
            np.copyto(cols, windows_of(x))
            return flat

        return im2col


def _allocating(op: Operator, shape: tuple, dtype: np.dtype, *xs: np.ndarray) -> np.ndarray:
    """`forward` = `forward_into` a fresh array with a throwaway workspace: one kernel, two entry points."""
    out = np.empty(shape, dtype)
    op.forward_into(Workspace(), out, *xs)
    return out


class Convolution(ConvGeometry):
    n_inputs = 2

    def infer(self, x, w):
        if x.ndim != 4 or w.ndim != 4:
            raise ShapeError(
                f"Convolution: input {shape_str(x.shape)} must be NCHW and weight "
                f"{shape_str(w.shape)} must be (out, in/groups, kh, kw)"
            )
        g = self.groups
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        if g < 1 or o % g or (c is not None and c % g):
            raise ShapeError(f"Convolution: groups={g} must divide input channels {c} and output channels {o}")
        if c is not None and not same_size(c // g, cg):
            raise ShapeError(
                f"Convolution: input {shape_str(x.shape)} has {c} channels but weight "
                f"{shape_str(w.shape)} expects {cg * g} (groups={g})"
            )
        oh, ow = self.out_hw(h, wd, kh, kw)
        if (oh is not None and oh < 1) or (ow is not None and ow < 1):
            raise ShapeError(
                f"Convolution: kernel {kh}x{kw} (dilation {self.dilation}) does not fit input "
                f"{shape_str(x.shape)} with padding {self.padding}"
            )
        if min(self.stride + self.dilation) < 1 or min(self.padding) < 0:
            raise ShapeError(
                f"Convolution: stride/dilation must be >= 1 and padding >= 0, got "
                f"{self.stride}/{self.dilation}/{self.padding}"
            )
        return (n, o, oh, ow), np.result_type(x.dtype, w.dtype)

    def forward(self, x, w):
        oh, ow = self.out_hw(*x.shape[2:], *w.shape[2:])
        return _allocating(self, (x.shape[0], w.shape[0], oh, ow), np.result_type(x, w), x, w)

    def forward_into(self, ws, out, x, w):
        self.bind(ws, out, x, w)(x, w)

    def bind(self, ws, out, x, w):
        im2col, product = self._cols(ws, x, *w.shape[2:]), conv_from_cols(out, w, self.groups)

        def run(x, w):
            product(im2col(x), w)

        return run

    def grad(self, out, dout):
        x, w = out.inputs
        geometry = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return [
            ConvolutionBackwardData.make(w, dout, x, **geometry),
            ConvolutionBackwardFilter.make(x, dout, w, **geometry),
        ]


def _contiguous(ws: Workspace, name: str, a: np.ndarray) -> np.ndarray:
    """`a` itself when C-contiguous, else a copy in the workspace (so reshapes stay views)."""
    if a.flags.c_contiguous:
        return a
    buf = ws.get(name, a.shape, a.dtype)
    np.copyto(buf, a)
    return buf


class ConvolutionBackwardData(ConvGeometry):
    """dL/dx from the weight and dL/dout; `like` is the forward input (for its shape)."""

    n_inputs = 3

    def infer(self, w, dout, like):
        return like.shape, dout.dtype

    def forward(self, w, dout, like):
        return _allocating(self, like.shape, dout.dtype, w, dout, like)

    def forward_into(self, ws, out, w, dout, like):
        self.bind(ws, out, w, dout, like)(w, dout, like)

    def bind(self, ws, out, w, dout, like):
        if self.stride[1] != 1:
            return partial(self._taps_backward, ws, out)
        return self._bind_rows(ws, out, w, dout, like)

    def _rows_backward(self, ws, out, w, dout, like):
        self._bind_rows(ws, out, w, dout, like)(w, dout, like)

    def _bind_rows(self, ws, out, w, dout, like):
        """Width stride 1: one matrix product does the kernel's columns too, so col2im is one
        add per kernel row (KH adds of whole contiguous rows instead of KH*KW strided ones).

        Batch-last layout throughout: dout's rows are laid out (O, OH, OWpad, N) with zero
        borders, the window view over them (O, KW, OH, Wp, N) is copied to one matrix, and
        (G, Cg*KH, Og*KW) @ (G, Og*KW, OH*Wp*N) gives, per input channel and kernel row, the
        gradient of every padded input row that kernel row touches. Every buffer and view is
        made here, once per plan; the returned kernel only runs the numpy calls."""
        o, cg, kh, kw = w.shape
        g, og = self.groups, o // self.groups
        n, c, h, wd = like.shape
        oh, ow = dout.shape[2:]
        (ph, pw), (dh, dw), sh = self.padding, self.dilation, self.stride[0]
        hp, wp = h + 2 * ph, wd + 2 * pw  # == ow + (kw - 1) * dw for width stride 1
        span = (kw - 1) * dw
        dpad = ws.get("dout_rows", (o, oh, ow + 2 * span, n), dout.dtype, zero=True)
        dpad_inner = dpad[:, :, span : span + ow]
        s_o, s_y, s_x, s_n = dpad.strides
        # window tap j' = kw-1-j of output column x lands on padded input column x + j*dw
        view = as_strided(dpad, (o, kw, oh, wp, n), (s_o, s_x * dw, s_y, s_x, s_n), writeable=False)
        windows_ = ws.get("dout_windows", (o, kw, oh, wp, n), dout.dtype)
        wm = ws.get("w_rows", (g, cg, kh, og, kw), w.dtype)  # taps reversed to match the view
        rows = ws.get("dx_rows", (c, kh, oh, wp, n), dout.dtype)
        wm_mat, windows_mat, rows_mat = (
            wm.reshape(g, cg * kh, og * kw),
            windows_.reshape(g, og * kw, -1),
            rows.reshape(g, cg * kh, -1),
        )
        dxp = ws.get("dx_t", (c, hp, wp, n), dout.dtype)
        # kernel row i adds to padded input rows y*sh + i*dh
        adds = [(dxp[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh], rows[:, i]) for i in range(kh)]
        result = dxp[:, ph : ph + h, pw : pw + wd].transpose(3, 0, 1, 2)

        def run(w, dout, like):
            np.copyto(dpad_inner, dout.transpose(1, 2, 3, 0))
            np.copyto(windows_, view)
            np.copyto(wm, w.reshape(g, og, cg, kh, kw)[..., ::-1].transpose(0, 2, 3, 1, 4))
            np.matmul(wm_mat, windows_mat, out=rows_mat)
            dxp.fill(0)
            for target, row in adds:
                np.add(target, row, out=target)
            np.copyto(out, result)

        return run

    def _taps_backward(self, ws, out, w, dout, like):
        """Any stride: columns (C, KH, KW, OH, OW, N) from one matrix product, then col2im as one
        strided add per kernel tap over long contiguous rows (OW*N), never per pixel."""
        o, cg, kh, kw = w.shape
        g = self.groups
        n, c, h, wd = like.shape
        oh, ow = dout.shape[2:]
        dout_t = ws.get("dout_t", (o, oh, ow, n), dout.dtype)
        np.copyto(dout_t, dout.transpose(1, 2, 3, 0))
        dcols = ws.get("dcols", (c, kh, kw, oh, ow, n), dout.dtype)
        # (G, K, O/G) @ (G, O/G, OH*OW*N) -> (G, K, OH*OW*N) == (C, KH, KW, OH, OW, N)
        np.matmul(
            w.reshape(g, o // g, cg * kh * kw).transpose(0, 2, 1),
            dout_t.reshape(g, o // g, -1),
            out=dcols.reshape(g, cg * kh * kw, -1),
        )
        ph, pw = self.padding
        dxp = ws.get("dx_t", (c, h + 2 * ph, wd + 2 * pw, n), dout.dtype)
        dxp.fill(0)
        (sh, sw), (dh, dw) = self.stride, self.dilation
        for i in range(kh):  # col2im: one strided add per kernel tap, never per pixel
            for j in range(kw):
                tap = dxp[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw]
                np.add(tap, dcols[:, i, j], out=tap)
        np.copyto(out, dxp[:, ph : ph + h, pw : pw + wd].transpose(3, 0, 1, 2))


class ConvolutionBackwardFilter(ConvGeometry):
    """dL/dw from the input and dL/dout; `like` is the weight (for its shape)."""

    n_inputs = 3

    def infer(self, x, dout, like):
        return like.shape, dout.dtype

    def forward(self, x, dout, like):
        return _allocating(self, like.shape, dout.dtype, x, dout, like)

    def forward_into(self, ws, out, x, dout, like):
        self.bind(ws, out, x, dout, like)(x, dout, like)

    def bind(self, ws, out, x, dout, like):
        im2col = self._cols(ws, x, *like.shape[2:])
        product = filter_grad_from_cols(ws, out, im2col(x), dout, self.groups)

        def run(x, dout, like):
            product(im2col(x), dout)

        return run


def conv_from_cols(out: np.ndarray, w: np.ndarray, g: int) -> Callable[[np.ndarray, np.ndarray], None]:
    """(G, O/G, K) @ (N, G, K, P) -> (N, G, O/G, P): that is NCHW already, no transpose."""
    o, n = w.shape[0], out.shape[0]
    out_mat = out.reshape(n, g, o // g, -1)

    def product(cols: np.ndarray, w: np.ndarray) -> None:
        np.matmul(w.reshape(g, o // g, -1), cols, out=out_mat)

    return product


def filter_grad_from_cols(
    ws: Workspace, out: np.ndarray, cols: np.ndarray, dout: np.ndarray, g: int
) -> Callable[[np.ndarray, np.ndarray], None]:
    """dwᵀ = sum over samples of cols_n @ dout_nᵀ: one small product per sample, then one sum.

    Computed transposed, (K, P) @ (P, O/G) per sample, because BLAS runs that orientation about
    twice as fast as dout_n @ cols_nᵀ for LeNet's second convolution (K=150, P=100)."""
    n, o = dout.shape[:2]
    per_sample = ws.get("per_sample", (n, g, cols.shape[2], o // g), dout.dtype)
    out_t = out.reshape(g, o // g, -1).transpose(0, 2, 1)  # (G, K, O/G), written through

    def product(cols: np.ndarray, dout: np.ndarray) -> None:
        d = _contiguous(ws, "dout", dout).reshape(n, g, o // g, -1)
        np.matmul(cols, d.transpose(0, 1, 3, 2), out=per_sample)  # (N, G, K, O/G)
        np.add.reduce(per_sample, axis=0, out=out_t)

    return product


# ----- the same kernels split at the column buffer, so forward and filter gradient share it -----

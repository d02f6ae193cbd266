"""2-D pooling (MegEngine's `opr::Pooling`), NCHW: max, average (padding counted, as MegEngine's
AVERAGE and PyTorch's default) and average excluding padding (ONNX's default)."""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator, shape_str
from .conv import _pair, out_size, pad_hw, windows

MODES = ("max", "average", "average_count_exclude_padding")


class _PoolGeometry(Operator):
    @classmethod
    def make(cls, *inputs, mode="max", window=2, stride=None, padding=0, name=None):
        window = _pair(window)
        return super().make(*inputs, mode=str(mode).lower(), window=window,
                            stride=_pair(window if stride is None else stride), padding=_pair(padding), name=name)

    def out_hw(self, h, w):
        return (out_size(h, self.window[0], self.stride[0], self.padding[0], 1),
                out_size(w, self.window[1], self.stride[1], self.padding[1], 1))

    def _taps(self, oh, ow):
        """For each window tap (i, j): the strided slice of the padded input it reads."""
        (kh, kw), (sh, sw) = self.window, self.stride
        for i in range(kh):
            for j in range(kw):
                yield i, j, (slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                             slice(j, j + sw * (ow - 1) + 1, sw))

    def _counts(self, h, w, oh, ow, dtype):
        """Per-output number of real (non-padding) inputs in its window."""
        ones = pad_hw(np.ones((1, 1, h, w), dtype), self.padding)
        return sum(ones[idx] for _, _, idx in self._taps(oh, ow))


class Pooling(_PoolGeometry):
    n_inputs = 1

    def infer(self, x):
        if x.ndim != 4:
            raise ShapeError(f"Pooling: input must be NCHW, got {shape_str(x.shape)}")
        if self.mode not in MODES:
            raise ShapeError(f"Pooling: mode {self.mode!r} is not one of {MODES}")
        if any(p * 2 > k for p, k in zip(self.padding, self.window)) or min(self.stride) < 1:
            raise ShapeError(f"Pooling: padding {self.padding} must be at most half the window {self.window}, "
                             f"stride {self.stride} >= 1")
        oh, ow = self.out_hw(*x.shape[2:])
        if (oh is not None and oh < 1) or (ow is not None and ow < 1):
            raise ShapeError(f"Pooling: window {self.window} does not fit input {shape_str(x.shape)}")
        return x.shape[:2] + (oh, ow), x.dtype

    def forward(self, x):
        oh, ow = self.out_hw(*x.shape[2:])
        if self.mode == "max":
            xp = pad_hw(x, self.padding, -np.inf)
            view = windows(xp, self.window, self.stride, (1, 1), (oh, ow))
            return view.max(axis=(4, 5))
        xp = pad_hw(x, self.padding)
        view = windows(xp, self.window, self.stride, (1, 1), (oh, ow))
        total = view.sum(axis=(4, 5))
        if self.mode == "average":
            return total / np.asarray(self.window[0] * self.window[1], x.dtype)
        return total / self._counts(*x.shape[2:], oh, ow, x.dtype)

    def grad(self, out, dout):
        geometry = dict(mode=self.mode, window=self.window, stride=self.stride, padding=self.padding)
        return [PoolingBackward.make(out.inputs[0], dout, **geometry)]


class PoolingBackward(_PoolGeometry):
    """dL/dx: max routes each gradient to its window's (first) maximum; average spreads it."""

    n_inputs = 2

    def infer(self, x, dout):
        return x.shape, dout.dtype

    def forward(self, x, dout):
        n, c, h, w = x.shape
        oh, ow = dout.shape[2:]
        ph, pw = self.padding
        dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dout.dtype)
        if self.mode == "max":
            view = windows(pad_hw(x, self.padding, -np.inf), self.window, self.stride, (1, 1), (oh, ow))
            winner = view.reshape(n, c, oh, ow, -1).argmax(axis=4)  # first maximum, as PyTorch
            kw = self.window[1]
            for i, j, idx in self._taps(oh, ow):
                dxp[idx] += np.where(winner == i * kw + j, dout, 0)
        else:
            share = dout / (np.asarray(self.window[0] * self.window[1], dout.dtype) if self.mode == "average"
                            else self._counts(h, w, oh, ow, dout.dtype))
            for _, _, idx in self._taps(oh, ow):
                dxp[idx] += share
        return dxp[:, :, ph:ph + h, pw:pw + w]

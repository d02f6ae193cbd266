"""2-D pooling (MegEngine's `opr::Pooling`), NCHW: max, average (padding counted, as MegEngine's
AVERAGE and PyTorch's default) and average excluding padding (ONNX's default).

Non-overlapping windows without padding (LeNet's 2x2/stride 2) take a fast path: one
elementwise call per window tap on strided views, no window copies. Max-pooling's backward
routes each gradient by index: to the first tap equal to the window maximum (fast path),
or through flat argmax indices summed with bincount (general path, overlaps included).
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..graph import ShapeError
from .base import Operator, Workspace, shape_str
from .conv import _pair, out_size, pad_hw, windows

MODES = ("max", "average", "average_count_exclude_padding")


class _PoolGeometry(Operator):
    @classmethod
    def make(cls, *inputs, mode="max", window=2, stride=None, padding=0, name=None):
        window = _pair(window)
        return super().make(
            *inputs,
            mode=str(mode).lower(),
            window=window,
            stride=_pair(window if stride is None else stride),
            padding=_pair(padding),
            name=name,
        )

    def out_hw(self, h, w):
        return (
            out_size(h, self.window[0], self.stride[0], self.padding[0], 1),
            out_size(w, self.window[1], self.stride[1], self.padding[1], 1),
        )

    def _taps(self, oh, ow):
        """For each window tap (i, j): the strided slice of the padded input it reads."""
        (kh, kw), (sh, sw) = self.window, self.stride
        for i in range(kh):
            for j in range(kw):
                yield (
                    i,
                    j,
                    (
                        slice(None),
                        slice(None),
                        slice(i, i + sh * (oh - 1) + 1, sh),
                        slice(j, j + sw * (ow - 1) + 1, sw),
                    ),
                )

    @property
    def tiled(self) -> bool:
        """Windows tile the input (window == stride, no padding): the fast path applies."""
        return list(self.window) == list(self.stride) and not any(self.padding)

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
            raise ShapeError(
                f"Pooling: padding {self.padding} must be at most half the window {self.window}, "
                f"stride {self.stride} >= 1"
            )
        oh, ow = self.out_hw(*x.shape[2:])
        if (oh is not None and oh < 1) or (ow is not None and ow < 1):
            raise ShapeError(f"Pooling: window {self.window} does not fit input {shape_str(x.shape)}")
        return x.shape[:2] + (oh, ow), x.dtype

    def forward(self, x):
        oh, ow = self.out_hw(*x.shape[2:])
        if self.tiled:
            out = np.empty(x.shape[:2] + (oh, ow), x.dtype)
            self.forward_into(Workspace(), out, x)
            return out
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

    def forward_into(self, ws, out, x):
        self.bind(ws, out, x)(x)

    def bind(self, ws, out, x):
        if not self.tiled:
            return lambda x: np.copyto(out, self.forward(x))
        index = [idx for _, _, idx in self._taps(*out.shape[2:])]
        combine = np.maximum if self.mode == "max" else np.add
        size = np.asarray(len(index), out.dtype)
        last: list = [None, None]  # under a plan x is the same buffer every step: slice it once

        def run(x):
            if x is not last[0]:
                last[:] = [x, [x[idx] for idx in index]]
            taps = last[1]
            combine(taps[0], taps[1], out=out) if len(taps) > 1 else np.copyto(out, taps[0])
            for tap in taps[2:]:
                combine(out, tap, out=out)
            if self.mode != "max":  # no padding here, so both average modes divide by the window size
                np.divide(out, size, out=out)

        return run

    def grad(self, out, dout):
        geometry = dict(mode=self.mode, window=self.window, stride=self.stride, padding=self.padding)
        return [PoolingBackward.make(out.inputs[0], dout, **geometry)]


class PoolingBackward(_PoolGeometry):
    """dL/dx: max routes each gradient to its window's (first) maximum; average spreads it."""

    n_inputs = 2

    def infer(self, x, dout):
        return x.shape, dout.dtype

    def forward(self, x, dout):
        out = np.empty(x.shape, dout.dtype)
        self.forward_into(Workspace(), out, x, dout)
        return out

    def forward_into(self, ws, out, x, dout):
        self.bind(ws, out, x, dout)(x, dout)

    def bind(self, ws, out, x, dout):
        if self.tiled:
            return self._tiled_backward(ws, out, x, dout)
        if self.mode == "max":
            return partial(self._max_backward, out)
        return partial(self._average_backward, out)

    def _tiled_backward(self, ws, dx, x, dout):
        """The kernel for inputs shaped like x and dout, its slices and scratch arrays made once."""
        oh, ow = dout.shape[2:]
        ragged = dx.shape[2] != oh * self.window[0] or dx.shape[3] != ow * self.window[1]
        index = [idx for _, _, idx in self._taps(oh, ow)]
        dx_taps = [dx[idx] for idx in index]
        if self.mode != "max":
            size = np.asarray(len(index), dout.dtype)

            def spread(x, dout):
                if ragged:
                    dx.fill(0)  # rows/columns past the last full window get no gradient
                for dx_tap in dx_taps:
                    np.divide(dout, size, out=dx_tap)

            return spread
        best = ws.get("max", dout.shape, x.dtype)  # the window maxima, recomputed from x
        router = _first_max_router(ws, dx, dout.shape, index, ragged)
        maximum = np.maximum

        def route(x, dout):
            x_taps = [x[idx] for idx in index]
            maximum(x_taps[0], x_taps[1], out=best) if len(x_taps) > 1 else np.copyto(best, x_taps[0])
            for x_tap in x_taps[2:]:
                maximum(best, x_tap, out=best)
            router(x_taps, best, dout)

        return route

    def _max_backward(self, out, x, dout):
        """Gradient to each window's first maximum, by flat index; overlapping windows add up."""
        n, c, h, w = x.shape
        oh, ow = dout.shape[2:]
        ph, pw = self.padding
        hp, wp = h + 2 * ph, w + 2 * pw
        view = windows(pad_hw(x, self.padding, -np.inf), self.window, self.stride, (1, 1), (oh, ow))
        kh, kw = self.window
        winner = view.reshape(n, c, oh, ow, kh * kw).argmax(axis=4)  # first maximum, as PyTorch
        rows = np.arange(oh)[:, None] * self.stride[0] + winner // kw
        cols = np.arange(ow)[None, :] * self.stride[1] + winner % kw
        plane = (np.arange(n * c) * hp * wp).reshape(n, c, 1, 1)
        flat = np.bincount(
            (plane + rows * wp + cols).ravel(), weights=dout.ravel().astype(np.float64), minlength=n * c * hp * wp
        )
        np.copyto(out, flat.reshape(n, c, hp, wp)[:, :, ph : ph + h, pw : pw + w])

    def _average_backward(self, out, x, dout):
        n, c, h, w = x.shape
        oh, ow = dout.shape[2:]
        ph, pw = self.padding
        dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dout.dtype)
        share = dout / (
            np.asarray(self.window[0] * self.window[1], dout.dtype)
            if self.mode == "average"
            else self._counts(h, w, oh, ow, dout.dtype)
        )
        for _, _, idx in self._taps(oh, ow):
            dxp[idx] += share
        np.copyto(out, dxp[:, :, ph : ph + h, pw : pw + w])


def _first_max_router(ws: Workspace, dx: np.ndarray, shape: tuple, index: list, ragged: bool):
    """For tiled windows: a function routing each window's gradient to the first of its taps
    (row-major, as PyTorch) that equals the window's maximum, writing every tap of `dx`."""
    dx_taps = [dx[idx] for idx in index]
    taken = ws.get("taken", shape, np.dtype(bool))  # window already routed (first max wins)
    hit = ws.get("hit", shape, np.dtype(bool))
    equal, greater, multiply, logical_or = np.equal, np.greater, np.multiply, np.logical_or

    def route(x_taps: list, best: np.ndarray, dout: np.ndarray) -> None:
        if ragged:
            dx.fill(0)  # rows/columns past the last full window get no gradient
        equal(x_taps[0], best, out=taken)  # the first tap takes every window it hits
        multiply(dout, taken, out=dx_taps[0])
        for k in range(1, len(x_taps)):
            equal(x_taps[k], best, out=hit)
            greater(hit, taken, out=hit)  # hit and not taken
            multiply(dout, hit, out=dx_taps[k])
            if k + 1 < len(x_taps):
                logical_or(taken, hit, out=taken)

    return route


class MaxPoolReluBackward(_PoolGeometry):
    """ReluGrad(y, PoolingBackward(y, dout)) for tiled max pooling of a ReLU's output y, given
    the forward pooling's maxima: made by the compiler's pool_relu_backward pass.

    The window maxima come from the forward (the same np.maximum calls, so the same values),
    and the ReLU's mask is applied to dout per window (max > 0 is the winner's y > 0) instead
    of to the full-size gradient: 2 small passes instead of 3 strided plus 2 full ones. Every
    element is dout times the same 0/1 factors in another order, so the bits are the same."""

    n_inputs = 3

    def infer(self, y, pooled, dout):
        raise ShapeError("MaxPoolReluBackward is made by the compiler, not added to graphs")

    def forward(self, y, pooled, dout):
        out = np.empty(y.shape, dout.dtype)
        self.forward_into(Workspace(), out, y, pooled, dout)
        return out

    def forward_into(self, ws, out, y, pooled, dout):
        self.bind(ws, out, y, pooled, dout)(y, pooled, dout)

    def bind(self, ws, out, y, pooled, dout):
        oh, ow = dout.shape[2:]
        ragged = out.shape[2] != oh * self.window[0] or out.shape[3] != ow * self.window[1]
        index = [idx for _, _, idx in self._taps(oh, ow)]
        router = _first_max_router(ws, out, dout.shape, index, ragged)
        positive = ws.get("positive", dout.shape, np.dtype(bool))
        masked = ws.get("masked", dout.shape, dout.dtype)
        if ow < 8 and dout.size > 1024:  # short rows, many of them: the tap-wise router is faster
            return self._tapwise(router, index, positive, masked)
        # Every tap at once: (KH, KW, N, C, OH, OW) views of y and of the gradient, one call each.
        hits = ws.get("hits", (*self.window, *dout.shape), np.dtype(bool))
        dx_taps = _tap_view(out, self.window, dout.shape, writeable=True)
        last: list = [None, None]
        greater, multiply, equal, logical_and = np.greater, np.multiply, np.equal, np.logical_and
        count = np.count_nonzero

        def run(y, pooled, dout):
            greater(pooled, 0, out=positive)
            multiply(dout, positive, out=masked)
            if y is not last[0]:  # under a plan y is the same buffer every step: view it once
                last[:] = [y, _tap_view(y, self.window, dout.shape)]
            # Only windows with a positive maximum send gradient (elsewhere masked is +-0 or NaN and
            # every tap gets masked * 0/1 = the same bits whichever tap wins). Where each of those has
            # exactly one tap equal to its maximum, that tap is the first one: route all taps at once.
            equal(last[1], pooled, out=hits)
            logical_and(hits, positive, out=hits)
            if count(hits) == count(positive):
                if ragged:
                    out.fill(0)
                multiply(masked, hits, out=dx_taps)
            else:  # ties in some window: the first tap equal to the maximum takes it
                router([y[idx] for idx in index], pooled, masked)

        return run

    @staticmethod
    def _tapwise(router, index, positive, masked):
        def run(y, pooled, dout):
            np.greater(pooled, 0, out=positive)
            np.multiply(dout, positive, out=masked)
            router([y[idx] for idx in index], pooled, masked)

        return run


def _tap_view(x: np.ndarray, window, shape: tuple, writeable: bool = False) -> np.ndarray:
    """The (KH, KW, N, C, OH, OW) view of tiled windows over x: [i, j] is tap (i, j) of every window."""
    s0, s1, s2, s3 = x.strides
    kh, kw = window
    return as_strided(x, (kh, kw, *shape), (s2, s3, s0, s1, s2 * kh, s3 * kw), writeable=writeable)

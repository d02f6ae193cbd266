"""Layer normalization (ONNX's LayerNormalization without its affine part): every position is
normalized over the axes from `axis` to the last, which must have static sizes.

The forward saves nothing; the gradient operator recomputes mean and 1/std from x, one pass:
dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the normalized axes.
"""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator, shape_str


def _axes(op: Operator, x) -> tuple[int, ...]:
    if not -x.ndim <= op.axis < x.ndim:
        raise ShapeError(f"{op.type_name}: axis {op.axis} out of range for {shape_str(x.shape)}")
    return tuple(range(op.axis % x.ndim, x.ndim))


def _statistics(x: np.ndarray, axes: tuple, eps: float) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=axes, keepdims=True)
    return centered, 1.0 / np.sqrt(var + x.dtype.type(eps))


class LayerNorm(Operator):
    n_inputs = 1

    def infer(self, x):
        axes = _axes(self, x)
        if any(x.shape[a] is None for a in axes):
            raise ShapeError(f"LayerNorm: the normalized axes {axes} of {shape_str(x.shape)} must be static")
        if not self.eps > 0:
            raise ShapeError(f"LayerNorm: eps must be positive, got {self.eps}")
        return x.shape, x.dtype

    def forward(self, x):
        centered, rstd = _statistics(x, tuple(range(self.axis % x.ndim, x.ndim)), self.eps)
        return centered * rstd

    def grad(self, out, dout):
        return [LayerNormGrad.make(out.inputs[0], dout, axis=self.axis, eps=self.eps)]


class LayerNormGrad(Operator):
    n_inputs = 2

    def infer(self, x, dout):
        _axes(self, x)
        return x.shape, dout.dtype

    def forward(self, x, dout):
        axes = tuple(range(self.axis % x.ndim, x.ndim))
        centered, rstd = _statistics(x, axes, self.eps)
        xhat = centered * rstd
        mean_g = dout.mean(axis=axes, keepdims=True)
        mean_gx = np.mean(dout * xhat, axis=axes, keepdims=True)
        return (rstd * (dout - mean_g - xhat * mean_gx)).astype(dout.dtype, copy=False)

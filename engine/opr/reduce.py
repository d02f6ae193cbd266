"""Reductions over axes: sum, mean, max."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np

from ..graph import ShapeError, SymbolVar
from .base import Operator, normalize_axes
from .elemwise import BroadcastLike, Div, Equal, Mul
from .shape import ReshapeLike


class _Reduce(Operator):
    n_inputs = 1

    @classmethod
    def make(
        cls, x: SymbolVar, axis: int | Sequence[int] | None = None, keepdims: bool = False, name: str | None = None
    ) -> SymbolVar:
        axes = normalize_axes(axis, x.ndim, cls.__name__)
        return super().make(x, axes=list(axes), keepdims=bool(keepdims), name=name)

    def infer(self, x):
        axes = set(self.axes)
        if any(not 0 <= a < x.ndim for a in axes):
            raise ShapeError(f"{self.type_name}: axes {self.axes} out of range for shape {x.shape}")
        if self.keepdims:
            shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
        else:
            shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return shape, x.dtype

    def _expand(self, g: SymbolVar, x: SymbolVar) -> SymbolVar:
        """Bring a reduced gradient back to keepdims layout, then broadcast it over x."""
        if not self.keepdims:
            g = ReshapeLike.make(g, x, keep_axes=self.axes)
        return BroadcastLike.make(g, x)


class Sum(_Reduce):
    def forward(self, x):
        return np.sum(x, axis=tuple(self.axes), keepdims=self.keepdims)

    def forward_into(self, ws, out, x):
        np.sum(x, axis=tuple(self.axes), keepdims=self.keepdims, out=out)

    def grad(self, out, dout):
        return [self._expand(dout, out.inputs[0])]


class Mean(_Reduce):
    def forward(self, x):
        return np.mean(x, axis=tuple(self.axes), keepdims=self.keepdims)

    def forward_into(self, ws, out, x):
        np.mean(x, axis=tuple(self.axes), keepdims=self.keepdims, out=out)

    def bind(self, ws, out, x):
        axes, keepdims = tuple(self.axes), self.keepdims
        count = np.intp(np.prod([x.shape[a] for a in axes], dtype=np.intp))
        if x.dtype.kind != "f" or x.dtype.itemsize < 4 or count == 0:
            return partial(self.forward_into, ws, out)
        add, divide = np.add.reduce, np.true_divide

        def run(x):  # np.mean's own two steps for float32/64, without its Python wrapper
            add(x, axis=axes, keepdims=keepdims, out=out)
            divide(out, count, out=out, casting="unsafe")

        return run

    def grad(self, out, dout):
        x = out.inputs[0]
        return [Mul.make(self._expand(dout, x), CountRatio.make(out, x))]


class Max(_Reduce):
    def forward(self, x):
        return np.max(x, axis=tuple(self.axes), keepdims=self.keepdims)

    def forward_into(self, ws, out, x):
        np.max(x, axis=tuple(self.axes), keepdims=self.keepdims, out=out)

    def grad(self, out, dout):
        x = out.inputs[0]
        winners = Equal.make(x, self._expand(out, x))  # ties share the gradient equally
        count = Sum.make(winners, self.axes, keepdims=True)
        return [Div.make(Mul.make(self._expand(dout, x), winners), count)]


class CountRatio(Operator):
    """size(reduced) / size(x) as a scalar: the mean's scale, known even when sizes are fed late."""

    n_inputs = 2
    shape_only_inputs = (0, 1)

    def infer(self, reduced, x):
        return (), x.dtype

    def forward(self, reduced, x):
        return np.asarray(self._ratio(reduced, x), dtype=x.dtype)

    def forward_into(self, ws, out, reduced, x):
        out[...] = self._ratio(reduced, x)

    @staticmethod
    def _ratio(reduced: np.ndarray, x: np.ndarray) -> float:
        if x.size == 0:
            raise ValueError(f"mean over an empty tensor of shape {x.shape}: is the batch empty?")
        return reduced.size / x.size

    def grad(self, out, dout):
        return [None, None]


class BesselCorrection(Operator):
    """n / (n - 1) for a variance over n = size(x) / size(reduced) values (the unbiased running
    variance of batch norm). One value per channel has no variance: an error, as in PyTorch."""

    n_inputs = 2
    shape_only_inputs = (0, 1)

    def infer(self, reduced, x):
        return (), x.dtype

    def forward(self, reduced, x):
        n = x.size // max(reduced.size, 1)
        if n < 2:
            raise ValueError(
                f"batch_norm: training needs more than one value per channel, got input of shape {x.shape}"
            )
        return np.asarray(n / (n - 1), dtype=x.dtype)

    def grad(self, out, dout):
        return [None, None]

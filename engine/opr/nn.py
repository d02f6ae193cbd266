"""Operators for classification and regularization: softmax family, one-hot indexing,
argmax, the dropout mask, and the train/eval switch."""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator, same_size, shape_str
from .elemwise import Mul, Sub
from .reduce import Sum


def _axis(axis: int, ndim: int, op: str) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"{op}: axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


class Softmax(Operator):
    n_inputs = 1

    def infer(self, x):
        _axis(self.axis, x.ndim, "Softmax")
        return x.shape, x.dtype

    def forward(self, x):
        e = np.exp(x - np.max(x, axis=self.axis, keepdims=True))
        return e / np.sum(e, axis=self.axis, keepdims=True)

    def grad(self, out, dout):
        # dx = y * (dy - sum(dy * y))
        inner = Sum.make(Mul.make(dout, out), self.axis, keepdims=True)
        return [Mul.make(out, Sub.make(dout, inner))]


class LogSoftmax(Operator):
    n_inputs = 1

    def infer(self, x):
        _axis(self.axis, x.ndim, "LogSoftmax")
        return x.shape, x.dtype

    def forward(self, x):
        shifted = x - np.max(x, axis=self.axis, keepdims=True)
        return shifted - np.log(np.sum(np.exp(shifted), axis=self.axis, keepdims=True))

    def grad(self, out, dout):
        # dx = dy - softmax(x) * sum(dy)
        total = Sum.make(dout, self.axis, keepdims=True)
        return [Sub.make(dout, Mul.make(ExpOf.make(out), total))]


class ExpOf(Operator):
    """exp(x) without a gradient path of its own (used inside other gradients)."""

    n_inputs = 1

    def infer(self, x):
        return x.shape, x.dtype

    def forward(self, x):
        return np.exp(x)


class IndexingOneHot(Operator):
    """out[i] = x[i, index[i]] along `axis` (MegEngine's IndexingOneHot): picks each row's label entry."""

    n_inputs = 2

    def infer(self, x, index):
        axis = _axis(self.axis, x.ndim, "IndexingOneHot")
        if index.dtype.kind not in "iu":
            raise ShapeError(f"IndexingOneHot: index must be integer, got {index.dtype}")
        expect = x.shape[:axis] + x.shape[axis + 1:]
        if index.ndim != len(expect) or not all(same_size(a, b) for a, b in zip(index.shape, expect)):
            raise ShapeError(f"IndexingOneHot: index shape {shape_str(index.shape)} does not match "
                             f"{shape_str(x.shape)} without axis {axis}")
        return expect, x.dtype

    def forward(self, x, index):
        picked = np.take_along_axis(x, np.expand_dims(index.astype(np.intp), self.axis), axis=self.axis)
        return np.squeeze(picked, axis=self.axis)

    def grad(self, out, dout):
        x, index = out.inputs
        return [IndexingOneHotGrad.make(dout, index, x, axis=self.axis), None]


class IndexingOneHotGrad(Operator):
    """Scatter `dout` into zeros shaped like x at the picked positions."""

    n_inputs = 3

    def infer(self, dout, index, x):
        return x.shape, dout.dtype

    def forward(self, dout, index, x):
        out = np.zeros(x.shape, dout.dtype)
        np.put_along_axis(out, np.expand_dims(index.astype(np.intp), self.axis),
                          np.expand_dims(dout, self.axis), axis=self.axis)
        return out


class OneHot(Operator):
    """Integer labels (N,) -> float (N, num_classes)."""

    n_inputs = 1

    def infer(self, labels):
        if labels.dtype.kind not in "iu":
            raise ShapeError(f"OneHot: labels must be integer, got {labels.dtype}")
        return labels.shape + (self.num_classes,), np.dtype(self.dtype)

    def forward(self, labels):
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"OneHot: labels must lie in [0, {self.num_classes}), got "
                             f"{labels.min()}..{labels.max()}")
        return np.eye(self.num_classes, dtype=self.dtype)[labels]

    def grad(self, out, dout):
        return [None]


class Argmax(Operator):
    n_inputs = 1

    def infer(self, x):
        axis = _axis(self.axis, x.ndim, "Argmax")
        return x.shape[:axis] + x.shape[axis + 1:], np.dtype(np.int64)

    def forward(self, x):
        return np.argmax(x, axis=self.axis)

    def grad(self, out, dout):
        return [None]


class DropoutMask(Operator):
    """A fresh keep-mask scaled by 1/(1-p) each step, shaped like x; seeded, so runs repeat."""

    n_inputs = 1

    def __init__(self, **attrs):
        super().__init__(**attrs)
        self._rng = np.random.default_rng(attrs.get("seed", 0))

    def infer(self, x):
        if not 0 <= self.p < 1:
            raise ShapeError(f"DropoutMask: drop probability must be in [0, 1), got {self.p}")
        return x.shape, x.dtype

    def forward(self, x):
        keep = self._rng.random(x.shape, dtype=np.float32) >= self.p
        return keep.astype(x.dtype) * np.asarray(1 / (1 - self.p), x.dtype)

    def grad(self, out, dout):
        return [None]

    def key(self):  # two masks are never the same computation
        return (self.type_name, id(self))


class ModeSelect(Operator):
    """`train` when the function is compiled for training, else `eval`.

    Dropout and batch normalization build both branches; the compiler keeps one and prunes
    the other, so a training and an evaluation function can share one graph and its weights.
    """

    n_inputs = 2

    def infer(self, train, eval_):
        if not all(same_size(a, b) for a, b in zip(train.shape, eval_.shape)) or train.ndim != eval_.ndim:
            raise ShapeError(f"ModeSelect: branches differ: {shape_str(train.shape)} vs {shape_str(eval_.shape)}")
        return train.shape, train.dtype

    def forward(self, train, eval_):
        raise ShapeError("ModeSelect must be resolved by the compiler before execution")

    def grad(self, out, dout):
        return [ModeSelect.make(dout, Mul.make(dout, 0.0)), ModeSelect.make(Mul.make(dout, 0.0), dout)]

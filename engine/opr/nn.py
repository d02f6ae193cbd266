"""Operators for classification and regularization: softmax family, one-hot indexing,
argmax, the dropout mask, and the train/eval switch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..graph import ShapeError
from .base import Operator, Workspace, same_size, shape_str
from .elemwise import Mul, Neg, Sub
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

    def forward_into(self, ws, out, x):
        self.bind(ws, out, x)(x)

    def bind(self, ws, out, x):
        axis = self.axis % x.ndim
        top = ws.get("top", x.shape[:axis] + (1,) + x.shape[axis + 1 :], x.dtype)
        e = ws.get("exp", x.shape, x.dtype)
        maximum, add, subtract, exp, log = np.maximum.reduce, np.add.reduce, np.subtract, np.exp, np.log

        def run(x):
            maximum(x, axis=axis, keepdims=True, out=top)
            subtract(x, top, out=out)
            exp(out, out=e)
            add(e, axis=axis, keepdims=True, out=top)
            log(top, out=top)
            subtract(out, top, out=out)

        return run

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
        expect = x.shape[:axis] + x.shape[axis + 1 :]
        if index.ndim != len(expect) or not all(same_size(a, b) for a, b in zip(index.shape, expect)):
            raise ShapeError(
                f"IndexingOneHot: index shape {shape_str(index.shape)} does not match "
                f"{shape_str(x.shape)} without axis {axis}"
            )
        self.index_name = index.name or "index"  # for run-time errors; not an attribute of the node
        return expect, x.dtype

    def check(self, x: np.ndarray, index: np.ndarray) -> None:
        """Run-time sizes and values: a label of another batch size or out of range would
        otherwise read (and send gradient to) another row's entry."""
        axis = self.axis % x.ndim
        name = getattr(self, "index_name", "index")
        if index.shape != x.shape[:axis] + x.shape[axis + 1 :]:
            raise ValueError(
                f"{name!r} has shape {index.shape} but the values it indexes have shape {x.shape} "
                f"(axis {axis}): do the batch sizes of input and {name!r} differ?"
            )
        if index.size and (index.min() < 0 or index.max() >= x.shape[axis]):
            bad = np.flatnonzero((index < 0) | (index >= x.shape[axis]))
            raise ValueError(
                f"{name!r} values must lie in [0, {x.shape[axis]}) for values of shape {x.shape}; "
                f"got {index.reshape(-1)[bad[0]]} at position {int(bad[0])} ({bad.size} out of range)"
            )

    def forward(self, x, index):
        self.check(x, index)
        picked = np.take_along_axis(x, np.expand_dims(index.astype(np.intp), self.axis), axis=self.axis)
        return np.squeeze(picked, axis=self.axis)

    def forward_into(self, ws, out, x, index):
        self.bind(ws, out, x, index)(x, index)

    def bind(self, ws, out, x, index):
        if x.ndim != 2 or self.axis != 1:
            return lambda x, index: np.copyto(out, self.forward(x, index))
        positions = _flat_positions(ws, index, x.shape[1])

        classes, unsigned = x.shape[1], np.dtype(index.dtype.str.replace("i", "u"))

        def run(x, index):
            if not x.flags.c_contiguous:
                np.copyto(out, self.forward(x, index))
                return
            # one reduction checks both bounds: a negative label is a huge unsigned one
            if index.size and index.view(unsigned).max() >= classes:
                self.check(x, index)
            x.reshape(-1).take(positions(index), out=out)

        return run

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
        np.put_along_axis(
            out, np.expand_dims(index.astype(np.intp), self.axis), np.expand_dims(dout, self.axis), axis=self.axis
        )
        return out

    def forward_into(self, ws, out, dout, index, x):
        if out.ndim != 2 or self.axis != 1:
            np.copyto(out, self.forward(dout, index, x))
            return
        out.fill(0)
        np.put(out.reshape(-1), _flat_positions(ws, index, out.shape[1])(index), dout)


def _flat_positions(ws, index: np.ndarray, classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """For indices shaped like `index`: a function giving the row-major positions of (i, index[i])
    in an (N, classes) array, in a reused buffer."""
    flat = ws.get("flat", index.shape, np.dtype(np.intp))
    rows = ws.get(
        f"rows{classes}", index.shape, np.dtype(np.intp), init=lambda a: np.multiply(np.arange(a.size), classes, out=a)
    )

    def positions(index: np.ndarray) -> np.ndarray:
        np.add(rows, index, out=flat, casting="unsafe")
        return flat

    return positions


class SoftmaxCrossEntropy(Operator):
    """Per-sample -log softmax(x)[label] along `axis`: one node forward, one kernel backward
    (a loss may emit it instead of log_softmax + indexing_one_hot + neg)."""

    n_inputs = 2

    def infer(self, x, label):
        self._picker = IndexingOneHot(axis=self.axis)
        return self._picker.infer(x, label)

    def forward(self, x, label):
        log_p = LogSoftmax(axis=self.axis).forward(x)
        return -self._picker.forward(log_p, label)

    def grad(self, out, dout):
        x, label = out.inputs
        # the loss is -picked, so the picked entries receive -dout
        return [
            SoftmaxCrossEntropyGrad.make(LogSoftmax.make(x, axis=self.axis), label, Neg.make(dout), axis=self.axis),
            None,
        ]


class SoftmaxCrossEntropyGrad(Operator):
    """d/dlogits of a loss that read log_p[label]: (onehot(label) - softmax) * dpicked.

    Inputs are the log-probabilities, the labels and dpicked, the gradient arriving at the
    picked entries. The compiler's softmax_cross_entropy pass puts this in place of the five
    nodes autodiff makes for log_softmax + indexing_one_hot (scatter, sum, exp, mul, sub)."""

    n_inputs = 3

    def infer(self, log_p, label, dpicked):
        IndexingOneHot(axis=self.axis).infer(log_p, label)
        return log_p.shape, log_p.dtype

    def forward(self, log_p, label, dpicked):
        out = np.empty(log_p.shape, log_p.dtype)
        self.forward_into(Workspace(), out, log_p, label, dpicked)
        return out

    def forward_into(self, ws, out, log_p, label, dpicked):
        self.bind(ws, out, log_p, label, dpicked)(log_p, label, dpicked)

    def bind(self, ws, out, log_p, label, dpicked):
        axis = self.axis

        column = out.shape[:axis] + (1,) + out.shape[axis + 1 :]  # dpicked with the class axis put back

        def scaled(log_p, dpicked):  # -softmax * d, then + d at each label: d - softmax * d, bit for bit
            np.exp(log_p, out=out)
            np.multiply(out, dpicked.reshape(column), out=out)
            np.negative(out, out=out)

        if out.ndim == 2 and axis == 1:
            positions = _flat_positions(ws, label, out.shape[1])
            picked = ws.get("picked", dpicked.shape, out.dtype)
            flat_out = out.reshape(-1)

            def run(log_p, label, dpicked):
                scaled(log_p, dpicked)
                flat = positions(label)
                flat_out.take(flat, out=picked)
                np.add(picked, dpicked, out=picked)
                flat_out.put(flat, picked)

            return run

        def general(log_p, label, dpicked):
            scaled(log_p, dpicked)
            at = np.expand_dims(label.astype(np.intp, copy=False), axis)
            picked = np.take_along_axis(out, at, axis=axis)
            np.put_along_axis(out, at, picked + np.expand_dims(dpicked, axis), axis=axis)

        return general


class OneHot(Operator):
    """Integer labels (N,) -> float (N, num_classes)."""

    n_inputs = 1

    def infer(self, labels):
        if labels.dtype.kind not in "iu":
            raise ShapeError(f"OneHot: labels must be integer, got {labels.dtype}")
        return labels.shape + (self.num_classes,), np.dtype(self.dtype)

    def forward(self, labels):
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"OneHot: labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        return np.eye(self.num_classes, dtype=self.dtype)[labels]

    def grad(self, out, dout):
        return [None]


class Argmax(Operator):
    n_inputs = 1

    def infer(self, x):
        axis = _axis(self.axis, x.ndim, "Argmax")
        return x.shape[:axis] + x.shape[axis + 1 :], np.dtype(np.int64)

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

    # ----- the generator's state, which checkpoints save so a resumed run draws the same masks -----
    def rng_state(self) -> dict:
        return self._rng.bit_generator.state

    def check_rng_state(self, state: dict) -> None:
        """Raise (TypeError, ValueError or KeyError) unless `state` is one `set_rng_state` takes;
        tried on a scratch generator, so this mask's own sequence is untouched."""
        type(self._rng.bit_generator)().state = state

    def set_rng_state(self, state: dict) -> None:
        """Continue the mask sequence from `state` (a `rng_state()`)."""
        self.check_rng_state(state)
        self._rng.bit_generator.state = state

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


class EmbeddingLookup(Operator):
    """Rows of a table: out[..., :] = weight[index[...], :] (an embedding layer; ONNX's Gather on axis 0)."""

    n_inputs = 2

    def infer(self, weight, index):
        if weight.ndim != 2:
            raise ShapeError(f"EmbeddingLookup: weight must be (rows, dim), got {shape_str(weight.shape)}")
        if index.dtype.kind not in "iu":
            raise ShapeError(f"EmbeddingLookup: index must be integer, got {index.dtype}")
        return index.shape + (weight.shape[1],), weight.dtype

    def forward(self, weight, index):
        if index.size and (index.min() < 0 or index.max() >= weight.shape[0]):
            raise ValueError(
                f"EmbeddingLookup: indices must lie in [0, {weight.shape[0]}), got {index.min()}..{index.max()}"
            )
        return weight[index]

    def grad(self, out, dout):
        weight, index = out.inputs
        return [EmbeddingLookupGrad.make(dout, index, weight), None]


class EmbeddingLookupGrad(Operator):
    """Scatter-add each looked-up row's gradient back into a table shaped like `weight`."""

    n_inputs = 3

    def infer(self, dout, index, weight):
        return weight.shape, dout.dtype

    def forward(self, dout, index, weight):
        out = np.zeros(weight.shape, dout.dtype)
        np.add.at(out, index.reshape(-1), dout.reshape(-1, weight.shape[1]))
        return out

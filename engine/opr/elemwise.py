"""Elementwise operators, with numpy broadcasting.

Binary gradients are summed back to each input's shape (`SumToShapeOf`), which is how
broadcasting shows up in the backward graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from ..graph import Shape, ShapeError, SourceKind, SymbolVar
from .base import Operator, broadcast_shapes, result_dtype, shape_str


class _Ufunc(Operator):
    """An operator that is one numpy ufunc call: the same kernel runs allocating or into `out`,
    and the fusion pass can chain it with its neighbours."""

    elementwise = True
    ufunc: ClassVar[np.ufunc | None] = None
    extra: ClassVar[tuple] = ()  # constant trailing arguments (relu: maximum(x, 0))

    def forward(self, *xs):
        return self.ufunc(*xs, *self.extra)

    def forward_into(self, ws, out, *xs):
        self.ufunc(*xs, *self.extra, out=out)


class _Unary(_Ufunc):
    n_inputs = 1

    def infer(self, x: SymbolVar) -> tuple[Shape, np.dtype]:
        return x.shape, x.dtype


class _Binary(_Ufunc):
    n_inputs = 2

    def infer(self, a: SymbolVar, b: SymbolVar) -> tuple[Shape, np.dtype]:
        return broadcast_shapes(self.type_name, a.shape, b.shape), result_dtype(a, b)


class _Compare(_Binary):
    def infer(self, a: SymbolVar, b: SymbolVar) -> tuple[Shape, np.dtype]:
        return broadcast_shapes(self.type_name, a.shape, b.shape), np.dtype(bool)

    def grad(self, out: SymbolVar, dout: SymbolVar) -> Sequence[SymbolVar | None]:
        return [None, None]  # piecewise constant


def unbroadcast(g: SymbolVar, like: SymbolVar) -> SymbolVar:
    """Sum a gradient down to the shape of the input it belongs to."""
    return g if g.shape == like.shape and None not in like.shape else SumToShapeOf.make(g, like)


# ----- binary arithmetic -----


class Add(_Binary):
    ufunc = np.add

    def grad(self, out, dout):
        a, b = out.inputs
        return [unbroadcast(dout, a), unbroadcast(dout, b)]


class Sub(_Binary):
    ufunc = np.subtract

    def grad(self, out, dout):
        a, b = out.inputs
        return [unbroadcast(dout, a), unbroadcast(Neg.make(dout), b)]


class Mul(_Binary):
    ufunc = np.multiply

    def grad(self, out, dout):
        a, b = out.inputs
        return [unbroadcast(Mul.make(dout, b), a), unbroadcast(Mul.make(dout, a), b)]


class Div(_Binary):
    ufunc = np.divide

    def grad(self, out, dout):
        a, b = out.inputs
        da = Div.make(dout, b)
        db = Neg.make(Div.make(Mul.make(dout, out), b))  # -dout * a / b^2 == -dout * out / b
        return [unbroadcast(da, a), unbroadcast(db, b)]


class Pow(_Binary):
    """a ** b. At a = 0 the gradients follow PyTorch: d/da is 0 where b == 0 (not 0 * inf), and
    d/db is 0 where b >= 0 (not 0 * log 0)."""

    ufunc = np.power

    def grad(self, out, dout):
        a, b = out.inputs
        b_is_zero = Equal.make(b, 0.0)
        # b * a ** (b - 1), with the exponent moved off -1 where b == 0 (that term is 0 anyway)
        safe_exponent = Where.make(b_is_zero, b.make_scalar(1.0), Sub.make(b, 1.0))
        da = Mul.make(dout, Mul.make(b, Pow.make(a, safe_exponent)))
        db = None
        if b.op.source_kind is not SourceKind.CONST:
            zero_base = LogicalAnd.make(Equal.make(a, 0.0), GreaterEqual.make(b, 0.0))
            db = Mul.make(dout, Mul.make(out, Log.make(Where.make(zero_base, a.make_scalar(1.0), a))))
        return [unbroadcast(da, a), None if db is None else unbroadcast(db, b)]


class Maximum(_Binary):
    """max(a, b); a tie sends half the gradient to each side, as PyTorch does."""

    ufunc = np.maximum

    def grad(self, out, dout):
        a, b = out.inputs
        tie = Mul.make(Mul.make(dout, 0.5), Equal.make(a, b))
        da = Add.make(Mul.make(dout, Greater.make(a, b)), tie)
        db = Add.make(Mul.make(dout, Greater.make(b, a)), tie)
        return [unbroadcast(da, a), unbroadcast(db, b)]


class Where(Operator):
    """cond ? a : b with numpy broadcasting; gradients go to the chosen side only."""

    n_inputs = 3
    elementwise = True

    def infer(self, cond, a, b):
        if cond.dtype != np.dtype(bool):
            raise ShapeError(f"Where: the condition must be boolean, got {cond.dtype} {shape_str(cond.shape)}")
        return broadcast_shapes("Where", cond.shape, a.shape, b.shape), np.result_type(a.dtype, b.dtype)

    def forward(self, cond, a, b):
        return np.where(cond, a, b)

    def grad(self, out, dout):
        cond, a, b = out.inputs
        da = None if a.dtype.kind != "f" else unbroadcast(Mul.make(dout, cond), a)
        db = None if b.dtype.kind != "f" else unbroadcast(Mul.make(dout, LogicalNot.make(cond)), b)
        return [None, da, db]


class LogicalAnd(_Binary):
    ufunc = np.logical_and

    def infer(self, a, b):
        return broadcast_shapes(self.type_name, a.shape, b.shape), np.dtype(bool)

    def grad(self, out, dout):
        return [None, None]


class GreaterEqual(_Compare):
    ufunc = np.greater_equal


class Greater(_Compare):
    ufunc = np.greater


class Equal(_Compare):
    ufunc = np.equal


class Less(_Compare):
    ufunc = np.less


class LessEqual(_Compare):
    ufunc = np.less_equal


class LogicalNot(_Unary):
    ufunc = np.logical_not

    def grad(self, out, dout):
        return [None]


# ----- unary math -----


class Neg(_Unary):
    ufunc = np.negative

    def grad(self, out, dout):
        return [Neg.make(dout)]


class Exp(_Unary):
    ufunc = np.exp

    def grad(self, out, dout):
        return [Mul.make(dout, out)]


class Log(_Unary):
    ufunc = np.log

    def grad(self, out, dout):
        return [Div.make(dout, out.inputs[0])]


class Sqrt(_Unary):
    ufunc = np.sqrt

    def grad(self, out, dout):
        return [Div.make(Mul.make(dout, 0.5), out)]


class Abs(_Unary):
    ufunc = np.absolute

    def grad(self, out, dout):
        return [Mul.make(dout, Sign.make(out.inputs[0]))]


class Sign(_Unary):
    ufunc = np.sign

    def grad(self, out, dout):
        return [None]


class Relu(_Unary):
    ufunc, extra = np.maximum, (0,)

    def grad(self, out, dout):
        return [ReluGrad.make(out, dout)]


class ReluGrad(Operator):
    """dout where the relu's output is positive (reads the output, so x can be freed).

    Computed as dout * (y > 0), two passes over memory; a NaN or inf in dout where y <= 0
    stays NaN (0 * inf) rather than being masked to 0."""

    n_inputs = 2
    elementwise = True

    def infer(self, y, dout):
        return dout.shape, dout.dtype

    def forward(self, y, dout):
        return np.multiply(dout, np.greater(y, 0))

    def forward_into(self, ws, out, y, dout):
        self.bind(ws, out, y, dout)(y, dout)

    def bind(self, ws, out, y, dout):
        on, greater, multiply = ws.get("on", y.shape, np.dtype(bool)), np.greater, np.multiply

        def run(y, dout):
            greater(y, 0, out=on)
            multiply(dout, on, out=out)

        return run


class Sigmoid(_Unary):
    forward_into = Operator.forward_into

    def forward(self, x):
        # exp of a non-positive number only: no overflow warnings for large |x|
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)

    def grad(self, out, dout):
        return [Mul.make(dout, Mul.make(out, Sub.make(1.0, out)))]


class Tanh(_Unary):
    ufunc = np.tanh

    def grad(self, out, dout):
        return [Mul.make(dout, Sub.make(1.0, Mul.make(out, out)))]


class Astype(_Unary):
    forward_into = Operator.forward_into

    def infer(self, x):
        return x.shape, np.dtype(self.dtype)

    def forward(self, x):
        return x.astype(self.dtype)

    def grad(self, out, dout):
        x = out.inputs[0]
        return [Astype.make(dout, dtype=x.dtype.name)] if x.dtype.kind == "f" else [None]


# ----- broadcasting and its inverse -----


class SumToShapeOf(Operator):
    """Sum `x` over the axes where it was broadcast relative to `like`."""

    n_inputs = 2
    shape_only_inputs = (1,)

    def passes_through(self, x, like):
        return 0 if x.shape == like.shape else None

    def infer(self, x, like):
        broadcast_shapes(self.type_name, x.shape, like.shape)
        return like.shape, x.dtype

    @staticmethod
    def _axes(x, like) -> tuple[int, ...]:
        lead = x.ndim - like.ndim
        return tuple(range(lead)) + tuple(
            lead + i for i, d in enumerate(like.shape) if d == 1 and x.shape[lead + i] != 1
        )

    def forward(self, x, like):
        axes = self._axes(x, like)
        return np.sum(x, axis=axes, keepdims=True).reshape(like.shape) if axes else x

    def forward_into(self, ws, out, x, like):
        self.bind(ws, out, x, like)(x, like)

    def bind(self, ws, out, x, like):
        axes = self._axes(x, like)
        if not axes:
            return lambda x, like: np.copyto(out, x)
        kept, reduce = out.reshape((1,) * (x.ndim - like.ndim) + like.shape), np.add.reduce
        return lambda x, like: reduce(x, axis=axes, keepdims=True, out=kept)

    def grad(self, out, dout):
        return [BroadcastLike.make(dout, out.inputs[0]), None]


class BroadcastLike(Operator):
    """Broadcast `x` to the shape of `like` (the gradient of a sum)."""

    n_inputs = 2
    shape_only_inputs = (1,)

    def infer(self, x, like):
        return broadcast_shapes(self.type_name, x.shape, like.shape), x.dtype

    def forward(self, x, like):
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, like.shape))

    def grad(self, out, dout):
        return [SumToShapeOf.make(dout, out.inputs[0]), None]

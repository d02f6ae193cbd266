"""Shape operators: reshape, transpose, concat. They move data; gradients move it back."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..graph import Shape, ShapeError, SymbolVar
from .base import Operator, shape_str


def _static_size(shape: Shape) -> int | None:
    return None if None in shape else int(np.prod(shape, dtype=np.int64))


class Reshape(Operator):
    """Reshape to `shape`; one entry may be -1 (inferred). A fed (None) size may sit behind -1."""

    n_inputs = 1

    @classmethod
    def make(cls, x: SymbolVar, shape: Sequence[int], name: str | None = None) -> SymbolVar:
        return super().make(x, shape=[int(d) for d in shape], name=name)

    def infer(self, x):
        target = list(self.shape)
        if sum(d == -1 for d in target) > 1 or any(d < -1 for d in target):
            raise ShapeError(f"Reshape: target {tuple(target)} may hold at most one -1 and no other negative")
        size = _static_size(x.shape)
        known = int(np.prod([d for d in target if d != -1], dtype=np.int64))
        if -1 in target:
            if size is None:
                out = tuple(None if d == -1 else d for d in target)
            else:
                if known == 0 or size % known:
                    raise ShapeError(f"Reshape: cannot reshape {shape_str(x.shape)} to {tuple(target)}")
                out = tuple(size // known if d == -1 else d for d in target)
        else:
            if size is not None and size != known:
                raise ShapeError(
                    f"Reshape: cannot reshape {shape_str(x.shape)} ({size} elements) to "
                    f"{tuple(target)} ({known} elements)"
                )
            static_part = int(np.prod([d for d in x.shape if d is not None], dtype=np.int64))
            if size is None and (static_part == 0 or known % static_part):
                raise ShapeError(
                    f"Reshape: {shape_str(x.shape)} has a multiple of {static_part} elements, "
                    f"which can never be {known} as {tuple(target)} needs"
                )
            out = tuple(target)
        return out, x.dtype

    def forward(self, x):
        return x.reshape(self.shape)

    def grad(self, out, dout):
        return [ReshapeLike.make(dout, out.inputs[0])]


class ReshapeLike(Operator):
    """Reshape `x` to the runtime shape of `like`, with `keep_axes` set to size 1: gradients of
    operators whose sizes are fed late need no static shape."""

    n_inputs = 2
    shape_only_inputs = (1,)

    @classmethod
    def make(cls, x: SymbolVar, like: SymbolVar, keep_axes: Sequence[int] = (), name: str | None = None) -> SymbolVar:
        return super().make(x, like, keep_axes=[int(a) for a in keep_axes], name=name)

    def _target(self, shape: Shape) -> tuple:
        return tuple(1 if i in self.keep_axes else d for i, d in enumerate(shape))

    def infer(self, x, like):
        shape = self._target(like.shape)
        a, b = _static_size(x.shape), _static_size(shape)
        if a is not None and b is not None and a != b:
            raise ShapeError(f"ReshapeLike: {shape_str(x.shape)} does not fit {shape_str(shape)}")
        return shape, x.dtype

    def forward(self, x, like):
        return x.reshape(self._target(like.shape))

    def grad(self, out, dout):
        return [ReshapeLike.make(dout, out.inputs[0]), None]


class Transpose(Operator):
    n_inputs = 1

    @classmethod
    def make(cls, x: SymbolVar, perm: Sequence[int] | None = None, name: str | None = None) -> SymbolVar:
        perm = list(range(x.ndim))[::-1] if perm is None else [int(p) for p in perm]
        return super().make(x, perm=perm, name=name)

    def infer(self, x):
        if sorted(self.perm) != list(range(x.ndim)):
            raise ShapeError(
                f"Transpose: {self.perm} is not a permutation of {x.ndim} axes (input {shape_str(x.shape)})"
            )
        return tuple(x.shape[p] for p in self.perm), x.dtype

    def forward(self, x):
        return np.transpose(x, self.perm)

    def grad(self, out, dout):
        return [Transpose.make(dout, list(np.argsort(self.perm)))]


class Concat(Operator):
    @classmethod
    def make(cls, xs: Sequence[SymbolVar], axis: int = 0, name: str | None = None) -> SymbolVar:
        return super().make(*xs, axis=int(axis), name=name)

    def infer(self, *xs):
        nd = xs[0].ndim
        axis = self.axis % nd if -nd <= self.axis < nd else None
        if axis is None:
            raise ShapeError(f"Concat: axis {self.axis} out of range for {nd} dimensions")
        total: int | None = 0
        for x in xs:
            if x.ndim != nd or any(
                i != axis and a is not None and b is not None and a != b
                for i, (a, b) in enumerate(zip(x.shape, xs[0].shape))
            ):
                raise ShapeError(
                    "Concat: shapes " + ", ".join(shape_str(v.shape) for v in xs) + f" differ outside axis {axis}"
                )
            total = None if total is None or x.shape[axis] is None else total + x.shape[axis]
        shape = list(xs[0].shape)
        shape[axis] = total
        return tuple(shape), np.result_type(*[x.dtype for x in xs])

    def forward(self, *xs):
        return np.concatenate(xs, axis=self.axis)

    def grad(self, out, dout):
        axis = self.axis % out.ndim
        grads, start = [], 0
        for x in out.inputs:
            size = x.shape[axis]
            if size is None or start is None:
                start = None
                grads.append(None)
                continue
            grads.append(Slice.make(dout, axis=axis, start=start, stop=start + size))
            start += size
        if None in grads:
            raise ShapeError(f"Concat: the gradient needs static sizes along axis {axis}")
        return grads


class Slice(Operator):
    """x[start:stop] along one axis."""

    n_inputs = 1

    def infer(self, x):
        if not -x.ndim <= self.axis < x.ndim:
            raise ShapeError(f"Slice: axis {self.axis} out of range for {shape_str(x.shape)}")
        shape = list(x.shape)
        size = shape[self.axis]
        stop = self.stop if size is None else min(self.stop, size)
        if not 0 <= self.start <= stop:
            raise ShapeError(f"Slice: [{self.start}:{self.stop}] is empty or out of range for {shape_str(x.shape)}")
        # a size fed at run time may end before `stop`: then the length is known only at run time
        shape[self.axis] = None if size is None else stop - self.start
        return tuple(shape), x.dtype

    def forward(self, x):
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(self.start, self.stop)
        return x[tuple(index)]

    def grad(self, out, dout):
        return [PadSlice.make(dout, out.inputs[0], axis=self.axis, start=self.start)]


class PadSlice(Operator):
    """Zeros shaped like `like` with `x` written at [start:] along `axis` (the gradient of Slice)."""

    n_inputs = 2

    def infer(self, x, like):
        return like.shape, x.dtype

    def forward(self, x, like):
        out = np.zeros(like.shape, x.dtype)
        index = [slice(None)] * x.ndim
        index[self.axis] = slice(self.start, self.start + x.shape[self.axis])
        out[tuple(index)] = x
        return out

    def grad(self, out, dout):
        return [
            Slice.make(dout, axis=self.axis, start=self.start, stop=self.start + out.inputs[0].shape[self.axis]),
            None,
        ]


class MatchShape(Operator):
    """`x` itself, checked at run time to have exactly `like`'s shape: losses that compare a
    prediction with a label use it, so a label of another batch size is an error, not a broadcast."""

    n_inputs = 2

    def infer(self, x, like):
        if x.ndim != like.ndim or any(a is not None and b is not None and a != b for a, b in zip(x.shape, like.shape)):
            raise ShapeError(f"{x.name or 'label'!r} {shape_str(x.shape)} must have the shape {shape_str(like.shape)}")
        self.names = (x.name or "label", like.name or "prediction")
        return x.shape, x.dtype

    def forward(self, x, like):
        if x.shape != like.shape:
            names = getattr(self, "names", ("label", "prediction"))
            raise ValueError(
                f"{names[0]!r} has shape {x.shape} but {names[1]!r} has shape {like.shape}: do the batch sizes differ?"
            )
        return x

    def grad(self, out, dout):
        return [dout, None]

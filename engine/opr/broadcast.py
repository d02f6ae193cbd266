"""`BroadcastTo` (ONNX's Expand): x broadcast to a static target shape. A size known only at
run time (the batch) is read from an axis of a reference input, so `cls_token.expand(x.shape[0], -1, -1)` needs no feed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..graph import ShapeError, SymbolVar
from .base import Operator, broadcast_shapes, shape_str
from .elemwise import unbroadcast


class BroadcastTo(Operator):
    """x broadcast to `shape`; where `shape` holds None, the size is `ref`'s axis `ref_axes[i]`."""

    @classmethod
    def make(
        cls,
        x: SymbolVar,
        shape: Sequence[int | None],
        ref: SymbolVar | None = None,
        ref_axes: Sequence[int | None] | None = None,
        name: str | None = None,
    ) -> SymbolVar:
        shape = [None if d is None else int(d) for d in shape]
        axes = [None] * len(shape) if ref_axes is None else [None if a is None else int(a) for a in ref_axes]
        inputs = (x,) if ref is None else (x, ref)
        return super().make(*inputs, shape=shape, ref_axes=axes, name=name)

    def _target(self, ref_shape: tuple | None) -> tuple:
        out = []
        for d, a in zip(self.shape, self.ref_axes):
            if d is None:
                if ref_shape is None or a is None or not -len(ref_shape) <= a < len(ref_shape):
                    raise ShapeError(f"BroadcastTo: size {self.shape} left open without a reference axis")
                d = ref_shape[a]
            out.append(d)
        return tuple(out)

    def infer(self, x, *ref):
        if len(ref) > 1 or len(self.ref_axes) != len(self.shape):
            raise ShapeError("BroadcastTo takes x and at most one reference input, one ref axis per size")
        target = self._target(ref[0].shape if ref else None)
        out = broadcast_shapes("BroadcastTo", x.shape, target)
        if len(out) != len(target) or any(t is not None and o != t and t != 1 for o, t in zip(out, target)):
            raise ShapeError(f"BroadcastTo: {shape_str(x.shape)} cannot be broadcast to {shape_str(target)}")
        return out, x.dtype

    def forward(self, x, *ref):
        target = self._target(ref[0].shape if ref else None)
        return np.broadcast_to(x, np.broadcast_shapes(x.shape, target))

    def grad(self, out, dout):
        return [unbroadcast(dout, out.inputs[0])] + [None] * (len(out.inputs) - 1)

"""`AddUpdate`: the only operator that writes. dest <- dest*alpha + delta*beta + bias.

Its kernel computes the new value; the runtime writes it into the shared tensor after every
reader of the old value has run (MegEngine orders this by topological sort; we run all
updates at the end of the step, which gives the same guarantee).
"""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError, SourceKind
from .base import Operator, broadcast_shapes, shape_str


class AddUpdate(Operator):
    n_inputs = 2

    @classmethod
    def make(cls, dest, delta, alpha: float = 1.0, beta: float = 1.0, bias: float = 0.0, name=None):
        return super().make(dest, delta, alpha=float(alpha), beta=float(beta), bias=float(bias), name=name)

    def infer(self, dest, delta):
        if dest.op.source_kind is not SourceKind.SHARED:
            raise ShapeError(f"AddUpdate: destination must be a shared tensor, got {dest!r}")
        if broadcast_shapes("AddUpdate", dest.shape, delta.shape) != dest.shape:
            raise ShapeError(
                f"AddUpdate: delta {shape_str(delta.shape)} does not fit destination "
                f"{shape_str(dest.shape)} ({dest.name})"
            )
        return dest.shape, dest.dtype

    def forward(self, dest, delta):
        out = delta * np.asarray(self.beta, dest.dtype) if self.beta != 1 else delta
        if self.alpha != 0:
            out = dest * np.asarray(self.alpha, dest.dtype) + out if self.alpha != 1 else dest + out
        elif self.alpha == 0:
            out = np.broadcast_to(out, dest.shape)
        if self.bias:
            out = out + np.asarray(self.bias, dest.dtype)
        return out.astype(dest.dtype, copy=False)

    def forward_into(self, ws, out, dest, delta):
        """The same arithmetic as `forward`, step by step into `out` (which may be dest's own buffer)."""
        dtype = dest.dtype
        if self.alpha == 0:
            if self.beta != 1:
                np.multiply(delta, np.asarray(self.beta, dtype), out=out)
            else:
                np.copyto(out, delta)
        elif self.alpha == 1:
            if self.beta != 1:
                np.multiply(delta, np.asarray(self.beta, dtype), out=out)
                np.add(dest, out, out=out)
            else:
                np.add(dest, delta, out=out)
        else:  # delta goes to scratch first: `out` may share delta's memory inside a fused chain
            scaled = ws.get("scaled", delta.shape, dtype)
            np.multiply(delta, np.asarray(self.beta, dtype), out=scaled) if self.beta != 1 else np.copyto(scaled, delta)
            np.multiply(dest, np.asarray(self.alpha, dtype), out=out)
            np.add(out, scaled, out=out)
        if self.bias:
            np.add(out, np.asarray(self.bias, dtype), out=out)

    def key(self):  # every update is its own write
        return (self.type_name, id(self))

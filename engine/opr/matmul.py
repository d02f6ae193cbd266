"""Matrix multiplication (MegEngine's `opr::MatrixMul`), 2-D with optional transposes, and its
batched form over stacks of matrices (attention)."""

from __future__ import annotations

import numpy as np

from ..graph import ShapeError
from .base import Operator, broadcast_shapes, result_dtype, same_size, shape_str
from .elemwise import unbroadcast


class MatrixMul(Operator):
    """C = op(A) @ op(B), op = transpose when `transpose_a` / `transpose_b` is set."""

    n_inputs = 2

    @classmethod
    def make(cls, a, b, transpose_a: bool = False, transpose_b: bool = False, name=None):
        return super().make(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b), name=name)

    def infer(self, a, b):
        if a.ndim != 2 or b.ndim != 2:
            raise ShapeError(f"MatrixMul: needs 2-D inputs, got {shape_str(a.shape)} and {shape_str(b.shape)}")
        m, k = a.shape[::-1] if self.transpose_a else a.shape
        k2, n = b.shape[::-1] if self.transpose_b else b.shape
        if not same_size(k, k2):
            raise ShapeError(
                f"MatrixMul: inner sizes differ: {shape_str(a.shape)}{'ᵀ' if self.transpose_a else ''}"
                f" @ {shape_str(b.shape)}{'ᵀ' if self.transpose_b else ''} ({k} vs {k2})"
            )
        return (m, n), result_dtype(a, b)

    def forward(self, a, b):
        return np.matmul(a.T if self.transpose_a else a, b.T if self.transpose_b else b)

    def forward_into(self, ws, out, a, b):
        self.bind(ws, out, a, b)(a, b)

    def bind(self, ws, out, a, b):
        ta, tb = self.transpose_a, self.transpose_b
        if (a.shape[0] if ta else a.shape[1]) == 1:
            # one term per entry (a batch-1 weight gradient): an outer product, not a matrix product
            # numpy would run through its slow non-BLAS loop. Same bits: each entry is one product.
            def outer(a, b):
                np.multiply(a.reshape(-1, 1), b.reshape(1, -1), out=out)

            return outer
        matmul = np.matmul
        if ta and tb:
            return lambda a, b: matmul(a.T, b.T, out=out)
        if ta:
            return lambda a, b: matmul(a.T, b, out=out)
        if tb:
            return lambda a, b: matmul(a, b.T, out=out)
        return lambda a, b: matmul(a, b, out=out)

    def grad(self, out, dout):
        a, b = out.inputs
        ta, tb = self.transpose_a, self.transpose_b
        # C = A B:  dA = dC Bᵀ, dB = Aᵀ dC, with the transposes folded into the flags
        da = (
            MatrixMul.make(b, dout, transpose_a=tb, transpose_b=True)
            if ta
            else MatrixMul.make(dout, b, transpose_b=not tb)
        )
        db = (
            MatrixMul.make(dout, a, transpose_a=True, transpose_b=ta)
            if tb
            else MatrixMul.make(a, dout, transpose_a=not ta)
        )
        return [da, db]


def _t(x: np.ndarray, flag: bool) -> np.ndarray:
    return np.swapaxes(x, -1, -2) if flag else x


class BatchedMatrixMul(Operator):
    """numpy's matmul over stacks of matrices: (..., M, K) @ (..., K, N), leading axes broadcast
    (attention's Q Kᵀ and its weighted sum of V). Transposes act on the last two axes."""

    n_inputs = 2

    @classmethod
    def make(cls, a, b, transpose_a: bool = False, transpose_b: bool = False, name=None):
        return super().make(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b), name=name)

    def infer(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ShapeError(
                f"BatchedMatrixMul: needs inputs of at least 2-D, got {shape_str(a.shape)} and {shape_str(b.shape)}"
            )
        m, k = a.shape[-2:][::-1] if self.transpose_a else a.shape[-2:]
        k2, n = b.shape[-2:][::-1] if self.transpose_b else b.shape[-2:]
        if not same_size(k, k2):
            raise ShapeError(
                f"BatchedMatrixMul: inner sizes differ: {shape_str(a.shape)} @ {shape_str(b.shape)} ({k} vs {k2})"
            )
        lead = broadcast_shapes("BatchedMatrixMul", a.shape[:-2], b.shape[:-2])
        return (*lead, m, n), result_dtype(a, b)

    def forward(self, a, b):
        return np.matmul(_t(a, self.transpose_a), _t(b, self.transpose_b))

    def forward_into(self, ws, out, a, b):
        np.matmul(_t(a, self.transpose_a), _t(b, self.transpose_b), out=out)

    def grad(self, out, dout):
        a, b = out.inputs
        ta, tb = self.transpose_a, self.transpose_b
        da = (
            BatchedMatrixMul.make(b, dout, transpose_a=tb, transpose_b=True)
            if ta
            else BatchedMatrixMul.make(dout, b, transpose_b=not tb)
        )
        db = (
            BatchedMatrixMul.make(dout, a, transpose_a=True, transpose_b=ta)
            if tb
            else BatchedMatrixMul.make(a, dout, transpose_a=not ta)
        )
        return [unbroadcast(da, a), unbroadcast(db, b)]

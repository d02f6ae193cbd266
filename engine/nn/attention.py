"""Transformer pieces: `LayerNorm` and `MultiheadAttention` (self-attention), with PyTorch's
parameter names and layouts, so a PyTorch state_dict loads unchanged."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import opr
from ..graph import ShapeError, SymbolVar
from .layers import Linear, _generator
from .module import Module, Parameter


class LayerNorm(Module):
    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight = Parameter(np.ones(shape, np.float32)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(shape, np.float32)) if elementwise_affine else None

    def forward(self, x: SymbolVar) -> SymbolVar:
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != self.normalized_shape:
            raise ShapeError(f"LayerNorm{self.normalized_shape}: input {x.shape} does not end in those sizes")
        g = x.graph
        w = None if self.weight is None else self.weight.in_graph(g)
        b = None if self.bias is None else self.bias.in_graph(g)
        return opr.layer_norm(x, w, b, axis=x.ndim - k, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class MultiheadAttention(Module):
    """Self-attention over (batch, length, embed) inputs (PyTorch's batch_first=True layout):
    softmax(q kᵀ / sqrt(d)) v per head, heads concatenated, then the output projection.
    Returns the attended sequence only (PyTorch also returns the averaged weights)."""

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        bound = np.sqrt(6.0 / (embed_dim + 3 * embed_dim))  # PyTorch's xavier_uniform_ on in_proj_weight
        self.in_proj_weight = Parameter(
            _generator[0].uniform(-bound, bound, (3 * embed_dim, embed_dim)).astype(np.float32)
        )
        self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, np.float32)) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        if bias:
            self.out_proj.bias.data[...] = 0

    def forward(self, x: SymbolVar) -> SymbolVar:
        if x.ndim != 3 or x.shape[2] != self.embed_dim or x.shape[1] is None:
            raise ShapeError(
                f"MultiheadAttention: input must be (batch, length, {self.embed_dim}), length static; got {x.shape}"
            )
        g, length, e, heads = x.graph, x.shape[1], self.embed_dim, self.num_heads
        d = e // heads
        qkv = opr.matrix_mul(opr.reshape(x, (-1, e)), self.in_proj_weight.in_graph(g), transpose_b=True)
        if self.in_proj_bias is not None:
            qkv = qkv + self.in_proj_bias.in_graph(g)

        def per_head(part: SymbolVar) -> SymbolVar:  # (N*L, E) -> (N, heads, L, d)
            return opr.transpose(opr.reshape(part, (-1, length, heads, d)), (0, 2, 1, 3))

        q, k, v = (per_head(p) for p in opr.split(qkv, [e, e, e], axis=1))
        weights = opr.softmax(opr.matmul(q, k, transpose_b=True) * float(1 / np.sqrt(d)), axis=-1)
        attended = opr.reshape(opr.transpose(opr.matmul(weights, v), (0, 2, 1, 3)), (-1, length, e))
        return self.out_proj(attended)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"

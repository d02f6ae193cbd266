"""The layers: each one composes `engine.opr` operators; weights are laid out as in PyTorch, so a
PyTorch `state_dict` loads unchanged (Linear weight is (out, in), biases are 1-D).

Initial values come from one generator (`manual_seed` resets it), with PyTorch's default
schemes: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv/linear, N(0, 1) for embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import opr
from ..graph import ShapeError, SymbolVar
from .module import Buffer, Module, Parameter

_generator = [np.random.default_rng(0)]


def manual_seed(seed: int) -> None:
    """Make the next layers' initial weights repeatable."""
    _generator[0] = np.random.default_rng(seed)


def _uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    bound = 1.0 / np.sqrt(fan_in)
    return _generator[0].uniform(-bound, bound, size=shape).astype(np.float32)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


class Conv2d(Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kh, kw = _pair(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"Conv2d: groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        fan_in = in_channels // groups * kh * kw
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = Parameter(_uniform((out_channels, in_channels // groups, kh, kw), fan_in))
        self.bias = Parameter(_uniform((out_channels,), fan_in)) if bias else None

    def forward(self, x: SymbolVar) -> SymbolVar:
        w = self.weight.in_graph(x.graph)
        y = opr.convolution(x, w, self.stride, self.padding, self.dilation, self.groups)
        if self.bias is None:
            return y
        return y + opr.reshape(self.bias.in_graph(x.graph), (1, -1, 1, 1))

    def extra_repr(self) -> str:
        o, i, kh, kw = self.weight.shape
        return f"{i * self.groups}, {o}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}"


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = Parameter(_uniform((out_features, in_features), in_features))
        self.bias = Parameter(_uniform((out_features,), in_features)) if bias else None

    def forward(self, x: SymbolVar) -> SymbolVar:
        """(..., in) -> (..., out): leading axes are folded into one for the matrix product."""
        lead = [-1 if d is None else d for d in x.shape[:-1]]
        flat = x if x.ndim == 2 else opr.reshape(x, (-1, x.shape[-1]))
        y = opr.matrix_mul(flat, self.weight.in_graph(x.graph), transpose_b=True)
        y = y if self.bias is None else y + self.bias.in_graph(x.graph)
        if x.ndim == 2:
            return y
        if lead.count(-1) > 1:
            raise ShapeError(f"Linear: at most one leading size of {x.shape} may be fed late")
        return opr.reshape(y, (*lead, y.shape[1]))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


class _Pool2d(Module):
    mode = "max"

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.pooling(x, self.mode, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        stride = self.kernel_size if self.stride is None else self.stride
        return f"kernel_size={self.kernel_size}, stride={stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    mode = "max"


class AvgPool2d(_Pool2d):
    """Average pooling; padding counts as zeros in the average (PyTorch's count_include_pad=True)."""

    mode = "average"


class ReLU(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.relu(x)


class Sigmoid(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.sigmoid(x)


class Tanh(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.tanh(x)


class ReLU6(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.relu6(x)


class GELU(Module):
    """Exact GELU (x * Phi(x)), PyTorch's default."""

    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.gelu(x)


class SiLU(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.silu(x)


class Hardswish(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.hard_swish(x)


class Hardsigmoid(Module):
    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.hard_sigmoid(x)


class AdaptiveAvgPool2d(Module):
    """Global average pooling: only output size 1 (what classifiers use) is supported."""

    def __init__(self, output_size: Any = 1) -> None:
        super().__init__()
        if _pair(output_size) != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 is supported, got {output_size}")

    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.global_avg_pool(x)


class Conv1d(Module):
    """(N, C, L) convolution; weight (out, in/groups, k) as in PyTorch."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, bias: bool = True) -> None:  # fmt: skip
        super().__init__()
        fan_in = in_channels // groups * kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight = Parameter(_uniform((out_channels, in_channels // groups, kernel_size), fan_in))
        self.bias = Parameter(_uniform((out_channels,), fan_in)) if bias else None

    def forward(self, x: SymbolVar) -> SymbolVar:
        y = opr.conv1d(x, self.weight.in_graph(x.graph), self.stride, self.padding, self.dilation, self.groups)
        return y if self.bias is None else y + opr.reshape(self.bias.in_graph(x.graph), (1, -1, 1))


class Flatten(Module):
    def __init__(self, start_dim: int = 1) -> None:
        super().__init__()
        self.start_dim = start_dim

    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.flatten(x, self.start_dim)


class Dropout(Module):
    """Zero a fraction `p` while training (both branches are built; each compiled function picks one)."""

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p, self.seed = p, seed

    def forward(self, x: SymbolVar) -> SymbolVar:
        return opr.dropout(x, self.p, self.seed) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchNorm2d(Module):
    """PyTorch's BatchNorm2d: batch statistics and running-stat updates in training, running stats in eval."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = Parameter(np.ones(num_features, np.float32))
        self.bias = Parameter(np.zeros(num_features, np.float32))
        self.running_mean = Buffer(np.zeros(num_features, np.float32))
        self.running_var = Buffer(np.ones(num_features, np.float32))

    def forward(self, x: SymbolVar) -> SymbolVar:
        if x.ndim != 4:
            raise ShapeError(f"BatchNorm2d: input must be NCHW, got shape {x.shape}")
        g = x.graph
        w, b = self.weight.in_graph(g), self.bias.in_graph(g)
        mean, var = self.running_mean.in_graph(g), self.running_var.in_graph(g)
        if self.training:
            return opr.batch_norm(x, w, b, mean, var, self.momentum, self.eps)
        view = (1, -1, 1, 1)
        scale = opr.reshape(w, view) / opr.sqrt(opr.reshape(var, view) + self.eps)
        return (x - opr.reshape(mean, view)) * scale + opr.reshape(b, view)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"


class Embedding(Module):
    """A table of `num_embeddings` vectors of size `embedding_dim`, looked up by integer index."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        table = _generator[0].standard_normal((num_embeddings, embedding_dim)).astype(np.float32)
        self.weight = Parameter(table)

    def forward(self, index: SymbolVar) -> SymbolVar:
        return opr.embedding(self.weight.in_graph(index.graph), index)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"

"""The everyday spelling of the operators: `opr.add(a, b)` is `Add.make(a, b)`, plus a few
compositions (flatten, dropout, batch_norm) built from several operators."""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..graph import ComputingGraph, ShapeError, SymbolVar
from .activation import Clip, Erf, Gelu, HardSigmoid, HardSwish, Silu
from .broadcast import BroadcastTo
from .conv import Convolution
from .depthwise import DepthwiseConvolution
from .elemwise import (
    Abs,
    Add,
    Astype,
    Div,
    Equal,
    Exp,
    Greater,
    Less,
    Log,
    Maximum,
    Mul,
    Neg,
    Pow,
    Relu,
    Sigmoid,
    Sqrt,
    Sub,
    Tanh,
    Where,
)
from .io import Host2DeviceCopy, SharedDeviceTensor
from .matmul import BatchedMatrixMul, MatrixMul
from .nn import (
    Argmax,
    DropoutMask,
    EmbeddingLookup,
    IndexingOneHot,
    LogSoftmax,
    ModeSelect,
    OneHot,
    Softmax,
    SoftmaxCrossEntropy,
)
from .normalization import LayerNorm
from .pooling import Pooling
from .reduce import BesselCorrection, Max, Mean, Sum
from .resize import ResizeNearest
from .shape import Concat, Reshape, Slice, Transpose
from .update import AddUpdate

# ----- sources -----


def host2device(
    graph: ComputingGraph, shape: Sequence[int | None], dtype: Any = "float32", name: str = "input"
) -> SymbolVar:
    """An input fed each step; use None (or -1) for a size known only when fed."""
    return Host2DeviceCopy.make(graph, shape, dtype, name)


def shared(graph: ComputingGraph, value: Any, name: str, trainable: bool = True) -> SymbolVar:
    """A tensor that lives across steps (a weight, a buffer)."""
    return SharedDeviceTensor.make(graph, value, name, trainable)


# ----- elementwise -----


def add(a: Any, b: Any) -> SymbolVar:
    return Add.make(a, b)


def sub(a: Any, b: Any) -> SymbolVar:
    return Sub.make(a, b)


def mul(a: Any, b: Any) -> SymbolVar:
    return Mul.make(a, b)


def div(a: Any, b: Any) -> SymbolVar:
    return Div.make(a, b)


def pow(a: Any, b: Any) -> SymbolVar:
    return Pow.make(a, b)  # noqa: A001 - MegEngine's name


def maximum(a: Any, b: Any) -> SymbolVar:
    return Maximum.make(a, b)


def equal(a: Any, b: Any) -> SymbolVar:
    return Equal.make(a, b)


def neg(x: SymbolVar) -> SymbolVar:
    return Neg.make(x)


def exp(x: SymbolVar) -> SymbolVar:
    return Exp.make(x)


def log(x: SymbolVar) -> SymbolVar:
    return Log.make(x)


def sqrt(x: SymbolVar) -> SymbolVar:
    return Sqrt.make(x)


def abs(x: SymbolVar) -> SymbolVar:
    return Abs.make(x)  # noqa: A001


def relu(x: SymbolVar) -> SymbolVar:
    return Relu.make(x)


def sigmoid(x: SymbolVar) -> SymbolVar:
    return Sigmoid.make(x)


def tanh(x: SymbolVar) -> SymbolVar:
    return Tanh.make(x)


def astype(x: SymbolVar, dtype: Any) -> SymbolVar:
    return Astype.make(x, dtype=np.dtype(dtype).name)


# ----- shape -----


def reshape(x: SymbolVar, shape: Sequence[int]) -> SymbolVar:
    return Reshape.make(x, shape)


def transpose(x: SymbolVar, perm: Sequence[int] | None = None) -> SymbolVar:
    return Transpose.make(x, perm)


def concat(xs: Sequence[SymbolVar], axis: int = 0) -> SymbolVar:
    return Concat.make(xs, axis)


def flatten(x: SymbolVar, start_axis: int = 1) -> SymbolVar:
    """Keep the axes before `start_axis`, merge the rest (the batch size may be fed late)."""
    if not 0 <= start_axis < x.ndim:
        raise ShapeError(f"flatten: start_axis {start_axis} out of range for {x.ndim} dimensions")
    rest = x.shape[start_axis:]
    if None in rest:
        raise ShapeError(f"flatten: the merged axes {rest} must have static sizes")
    merged = int(np.prod(rest, dtype=np.int64))
    lead = [(-1 if d is None else d) for d in x.shape[:start_axis]]
    if lead.count(-1) > 1:
        raise ShapeError(f"flatten: at most one leading size may be fed late, got {x.shape}")
    return Reshape.make(x, [*lead, merged])


# ----- reductions -----


def sum(x: SymbolVar, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> SymbolVar:  # noqa: A001
    return Sum.make(x, axis, keepdims)


def mean(x: SymbolVar, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> SymbolVar:
    return Mean.make(x, axis, keepdims)


def max(x: SymbolVar, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> SymbolVar:  # noqa: A001
    return Max.make(x, axis, keepdims)


# ----- neural network -----


def matrix_mul(a: SymbolVar, b: SymbolVar, transpose_a: bool = False, transpose_b: bool = False) -> SymbolVar:
    return MatrixMul.make(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def convolution(
    x: SymbolVar, w: SymbolVar, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1
) -> SymbolVar:
    """2-D convolution; one group per input channel (depthwise) runs its own operator."""
    if groups > 1 and x.ndim == 4 and groups == x.shape[1] and w.ndim == 4 and w.shape[1] == 1:
        return DepthwiseConvolution.make(x, w, stride=stride, padding=padding, dilation=dilation)
    return Convolution.make(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)


def pooling(x: SymbolVar, mode: str = "max", window: Any = 2, stride: Any = None, padding: Any = 0) -> SymbolVar:
    return Pooling.make(x, mode=mode, window=window, stride=stride, padding=padding)


def softmax(x: SymbolVar, axis: int = -1) -> SymbolVar:
    return Softmax.make(x, axis=axis)


def log_softmax(x: SymbolVar, axis: int = -1) -> SymbolVar:
    return LogSoftmax.make(x, axis=axis)


def argmax(x: SymbolVar, axis: int = -1) -> SymbolVar:
    return Argmax.make(x, axis=axis)


def softmax_cross_entropy(logits: SymbolVar, label: SymbolVar, axis: int = 1) -> SymbolVar:
    """Per-sample -log softmax(logits)[label], forward and gradient each one kernel."""
    return SoftmaxCrossEntropy.make(logits, label, axis=axis % logits.ndim)


def indexing_one_hot(x: SymbolVar, index: SymbolVar, axis: int = 1) -> SymbolVar:
    """x[i, index[i]] along `axis`."""
    return IndexingOneHot.make(x, index, axis=axis % x.ndim)


def embedding(weight: SymbolVar, index: SymbolVar) -> SymbolVar:
    """weight[index]: one row of the (rows, dim) table per integer index."""
    return EmbeddingLookup.make(weight, index)


def one_hot(labels: SymbolVar, num_classes: int, dtype: Any = "float32") -> SymbolVar:
    return OneHot.make(labels, num_classes=int(num_classes), dtype=np.dtype(dtype).name)


def dropout(x: SymbolVar, p: float = 0.5, seed: int = 0) -> SymbolVar:
    """Random zeroing with 1/(1-p) scaling while training; identity in evaluation."""
    if p == 0:
        return x
    return ModeSelect.make(Mul.make(x, DropoutMask.make(x, p=float(p), seed=int(seed))), x)


def batch_norm(
    x: SymbolVar,
    weight: SymbolVar,
    bias: SymbolVar,
    running_mean: SymbolVar,
    running_var: SymbolVar,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> SymbolVar:
    """Batch normalization over every axis but 1 (channels), PyTorch's semantics.

    Training normalizes with the batch's statistics and moves the running ones (an update
    attached to the result); evaluation uses the running statistics.
    """
    axes = [a for a in range(x.ndim) if a != 1]
    channels = x.shape[1]
    if channels is None or weight.shape != (channels,):
        raise ShapeError(
            f"batch_norm: input {x.shape} needs weight/bias/statistics of shape ({channels},), got {weight.shape}"
        )
    view = [1, channels] + [1] * (x.ndim - 2)

    def normalize(m: SymbolVar, v: SymbolVar) -> SymbolVar:
        scale = Div.make(Reshape.make(weight, view), Sqrt.make(Add.make(v, eps)))
        return Add.make(Mul.make(Sub.make(x, m), scale), Reshape.make(bias, view))

    batch_mean = Mean.make(x, axes, keepdims=True)
    centered = Sub.make(x, batch_mean)
    batch_var = Mean.make(Mul.make(centered, centered), axes, keepdims=True)
    train = normalize(batch_mean, batch_var)
    unbiased = Mul.make(batch_var, BesselCorrection.make(batch_mean, x))
    train.side_updates += [
        AddUpdate.make(running_mean, Reshape.make(batch_mean, [channels]), alpha=1 - momentum, beta=momentum),
        AddUpdate.make(running_var, Reshape.make(unbiased, [channels]), alpha=1 - momentum, beta=momentum),
    ]
    evaluate = normalize(Reshape.make(running_mean, view), Reshape.make(running_var, view))
    return ModeSelect.make(train, evaluate)


def add_update(dest: SymbolVar, delta: Any, alpha: float = 1.0, beta: float = 1.0, bias: float = 0.0) -> SymbolVar:
    """dest <- dest*alpha + delta*beta + bias when the compiled function runs."""
    return AddUpdate.make(dest, delta, alpha=alpha, beta=beta, bias=bias)


# ----- today's small models: attention, normalization, activations, depthwise and 1-D convolution -----


def erf(x: SymbolVar) -> SymbolVar:
    return Erf.make(x)


def gelu(x: SymbolVar) -> SymbolVar:
    """Exact GELU, x * Phi(x) (PyTorch's default)."""
    return Gelu.make(x)


def silu(x: SymbolVar) -> SymbolVar:
    return Silu.make(x)


def clip(x: SymbolVar, low: float | None = None, high: float | None = None) -> SymbolVar:
    return Clip.make(x, low=None if low is None else float(low), high=None if high is None else float(high))


def relu6(x: SymbolVar) -> SymbolVar:
    return clip(x, 0.0, 6.0)


def hard_sigmoid(x: SymbolVar, alpha: float = 1 / 6, beta: float = 0.5) -> SymbolVar:
    return HardSigmoid.make(x, alpha=float(alpha), beta=float(beta))


def hard_swish(x: SymbolVar) -> SymbolVar:
    return HardSwish.make(x)


def where(cond: SymbolVar, a: Any, b: Any) -> SymbolVar:
    return Where.make(cond, a, b)


def less(a: Any, b: Any) -> SymbolVar:
    return Less.make(a, b)


def greater(a: Any, b: Any) -> SymbolVar:
    return Greater.make(a, b)


def broadcast_to(x: SymbolVar, shape: Sequence[int | None], ref: SymbolVar | None = None, ref_axes=None) -> SymbolVar:
    """x broadcast to `shape`; None sizes are read at run time from `ref`'s axes `ref_axes`."""
    return BroadcastTo.make(x, shape, ref, ref_axes)


def matmul(a: SymbolVar, b: SymbolVar, transpose_a: bool = False, transpose_b: bool = False) -> SymbolVar:
    """numpy's matmul: 2-D is MatrixMul, stacks of matrices (broadcast leading axes) BatchedMatrixMul."""
    if a.ndim == 2 and b.ndim == 2:
        return MatrixMul.make(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    return BatchedMatrixMul.make(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def layer_norm(
    x: SymbolVar, weight: SymbolVar | None = None, bias: SymbolVar | None = None, axis: int = -1, eps: float = 1e-5
) -> SymbolVar:
    """Normalize over the axes from `axis` on; then scale and shift (shaped like those axes)."""
    y = LayerNorm.make(x, axis=int(axis) % x.ndim, eps=float(eps))
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def split(x: SymbolVar, sizes: Sequence[int], axis: int = 0) -> list[SymbolVar]:
    """Consecutive pieces of `sizes` along `axis` (ONNX's Split; q, k, v from one projection)."""
    axis %= x.ndim
    if x.shape[axis] is not None and builtins.sum(sizes) != x.shape[axis]:
        raise ShapeError(f"split: sizes {list(sizes)} do not add up to axis {axis} of {x.shape}")
    starts = np.cumsum([0, *sizes])
    return [Slice.make(x, axis=axis, start=int(a), stop=int(b)) for a, b in zip(starts[:-1], starts[1:])]


def depthwise_convolution(
    x: SymbolVar, w: SymbolVar, stride: Any = 1, padding: Any = 0, dilation: Any = 1
) -> SymbolVar:
    return DepthwiseConvolution.make(x, w, stride=stride, padding=padding, dilation=dilation)


def conv1d(
    x: SymbolVar, w: SymbolVar, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1
) -> SymbolVar:
    """(N, C, L) * (O, C/groups, K): the 2-D convolution on (N, C, 1, L), reshaped back."""
    if x.ndim != 3 or w.ndim != 3:
        raise ShapeError(f"conv1d: input {x.shape} must be (N, C, L) and weight {w.shape} (O, C/groups, K)")
    lead = -1 if x.shape[0] is None else x.shape[0]
    y = convolution(
        Reshape.make(x, [lead, x.shape[1], 1, x.shape[2]]),
        Reshape.make(w, [w.shape[0], w.shape[1], 1, w.shape[2]]),
        stride=(1, stride),
        padding=(0, padding),
        dilation=(1, dilation),
        groups=groups,
    )
    return Reshape.make(y, [lead, y.shape[1], y.shape[3]])


def global_avg_pool(x: SymbolVar) -> SymbolVar:
    """Mean over every axis after channels, kept as size 1 (ONNX's GlobalAveragePool)."""
    return Mean.make(x, list(range(2, x.ndim)), keepdims=True)


def resize_nearest(
    x: SymbolVar, size: Sequence[int], coordinate: str = "asymmetric", nearest: str = "floor"
) -> SymbolVar:
    return ResizeNearest.make(x, size=[int(s) for s in size], coordinate=coordinate, nearest=nearest)

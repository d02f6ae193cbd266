"""Losses insert their computation into the graph (MegEngine's `ILoss`).

A loss is called with the prediction and the label nodes and returns a scalar node ("mean" or
"sum"), which `grad` can take; cross entropy's "none" returns the per-sample losses instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from . import opr
from .graph import ShapeError, SymbolVar

REDUCE_MODES = ("mean", "sum")


def _reduce(values: SymbolVar, mode: str) -> SymbolVar:
    return opr.mean(values) if mode == "mean" else opr.sum(values)


def _check_mode(mode: str, allow_none: bool = False) -> str:
    mode = mode.lower()
    allowed = (*REDUCE_MODES, "none") if allow_none else REDUCE_MODES
    if mode not in allowed:
        raise ValueError(f"reduce_mode must be one of {allowed}, got {mode!r}")
    return mode


def _same_shape(loss: str, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
    """`label`, checked now against the static sizes and at run time against the fed ones."""
    if pred.ndim != label.ndim or any(
        a is not None and b is not None and a != b for a, b in zip(pred.shape, label.shape, strict=True)
    ):
        raise ShapeError(f"{loss}: prediction {pred.shape} and label {label.shape} must have the same shape")
    return opr.MatchShape.make(label, pred)


class ILoss(ABC):
    @abstractmethod
    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        """Add the loss of `pred` against `label` to the graph; return a scalar node."""

    def label_input(self, pred: SymbolVar) -> tuple[tuple, np.dtype]:
        """Shape and dtype of the label input a training graph feeds: class indices by default."""
        return (None,), np.dtype(np.int64)


class CrossEntropyLoss(ILoss):
    """Cross entropy against integer class labels, from logits (default) or probabilities.

    As PyTorch's: `weight` (one per class) weighs each sample by its label's weight and the mean
    divides by the sum of those weights; labels equal to `ignore_index` count for nothing (None:
    every label must be a class); `reduce_mode="none"` returns the per-sample losses.
    """

    def __init__(
        self,
        with_logits: bool = True,
        label_smooth: float = 0.0,
        reduce_mode: str = "mean",
        axis: int = 1,
        weight: Sequence[float] | np.ndarray | None = None,
        ignore_index: int | None = None,
    ) -> None:
        if not 0 <= label_smooth < 1:
            raise ValueError(f"label_smooth must be in [0, 1), got {label_smooth}")
        if label_smooth and (weight is not None or ignore_index is not None):
            raise ValueError("label_smooth together with weight or ignore_index is not supported")
        self.with_logits, self.label_smooth, self.axis = with_logits, label_smooth, axis
        self.reduce_mode = _check_mode(reduce_mode, allow_none=True)
        self.weight = None if weight is None else np.asarray(weight, np.float64).reshape(-1)
        if self.weight is not None and (self.weight.size == 0 or np.any(self.weight < 0)):
            raise ValueError(f"class weights must be non-negative, one per class, got {self.weight.tolist()}")
        self.ignore_index = None if ignore_index is None else int(ignore_index)

    def label_input(self, pred: SymbolVar) -> tuple[tuple, np.dtype]:
        axis = self.axis % pred.ndim
        return tuple(d for i, d in enumerate(pred.shape) if i != axis), np.dtype(np.int64)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        if label.dtype.kind not in "iu":
            raise ShapeError(f"CrossEntropyLoss: labels must be integer class indices, got {label.dtype}")
        classes = pred.shape[self.axis % pred.ndim]
        if self.weight is not None and self.weight.size != classes:
            raise ShapeError(f"CrossEntropyLoss: {self.weight.size} class weights for {classes} classes ({pred.shape})")
        log_prob = opr.log_softmax(pred, axis=self.axis) if self.with_logits else opr.log(pred)
        if self.weight is None and self.ignore_index is None:
            nll = -opr.indexing_one_hot(log_prob, label, axis=self.axis)
            if self.label_smooth:
                smooth = -opr.mean(log_prob, axis=self.axis)
                nll = nll * (1 - self.label_smooth) + smooth * self.label_smooth
            return nll if self.reduce_mode == "none" else _reduce(nll, self.reduce_mode)
        keep = None
        if self.ignore_index is not None:
            keep = opr.LogicalNot.make(opr.equal(label, np.asarray(self.ignore_index, label.dtype)))
            label = opr.Where.make(keep, label, np.asarray(0, label.dtype), name=label.name)  # its loss is zeroed
        nll = -opr.indexing_one_hot(log_prob, label, axis=self.axis)
        share = None
        if self.weight is not None:
            table = pred.graph.constant(self.weight.astype(pred.dtype).reshape(-1, 1))
            share = opr.ReshapeLike.make(opr.embedding(table, label), nll)
        if keep is not None:
            kept = opr.astype(keep, pred.dtype)
            share = kept if share is None else share * kept
        per_sample = nll * share
        if self.reduce_mode != "mean":
            return per_sample if self.reduce_mode == "none" else opr.sum(per_sample)
        return opr.sum(per_sample) / opr.sum(share)


class _Regression(ILoss):
    """A loss whose label has the prediction's shape and dtype."""

    def label_input(self, pred: SymbolVar) -> tuple[tuple, np.dtype]:
        return pred.shape, pred.dtype


class MSELoss(_Regression):
    def __init__(self, reduce_mode: str = "mean") -> None:
        self.reduce_mode = _check_mode(reduce_mode)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        label = _same_shape("MSELoss", pred, label)
        diff = pred - label
        return _reduce(diff * diff, self.reduce_mode)


class L1Loss(_Regression):
    def __init__(self, reduce_mode: str = "mean") -> None:
        self.reduce_mode = _check_mode(reduce_mode)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        label = _same_shape("L1Loss", pred, label)
        return _reduce(opr.abs(pred - label), self.reduce_mode)


class BCEWithLogitsLoss(_Regression):
    """Binary cross entropy on logits, in the overflow-free form max(x,0) - x*y + log(1 + exp(-|x|))."""

    def __init__(self, reduce_mode: str = "mean") -> None:
        self.reduce_mode = _check_mode(reduce_mode)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        label = _same_shape("BCEWithLogitsLoss", pred, label)
        values = opr.relu(pred) - pred * label + opr.log(1.0 + opr.exp(-opr.abs(pred)))
        return _reduce(values, self.reduce_mode)


LOSSES = {"cross_entropy": CrossEntropyLoss, "mse": MSELoss, "l1": L1Loss, "bce_with_logits": BCEWithLogitsLoss}

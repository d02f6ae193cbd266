"""Losses insert their computation into the graph (MegEngine's `ILoss`).

A loss is called with the prediction and the label nodes and returns a scalar node; under
either reduce mode the result is a scalar, so `grad` can always take it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from . import opr
from .graph import ShapeError, SymbolVar

REDUCE_MODES = ("mean", "sum")


def _reduce(values: SymbolVar, mode: str) -> SymbolVar:
    return opr.mean(values) if mode == "mean" else opr.sum(values)


def _check_mode(mode: str) -> str:
    mode = mode.lower()
    if mode not in REDUCE_MODES:
        raise ValueError(f"reduce_mode must be one of {REDUCE_MODES}, got {mode!r}")
    return mode


def _same_shape(loss: str, pred: SymbolVar, label: SymbolVar) -> None:
    if pred.ndim != label.ndim or any(
        a is not None and b is not None and a != b for a, b in zip(pred.shape, label.shape, strict=True)
    ):
        raise ShapeError(f"{loss}: prediction {pred.shape} and label {label.shape} must have the same shape")


class ILoss(ABC):
    @abstractmethod
    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        """Add the loss of `pred` against `label` to the graph; return a scalar node."""

    def label_input(self, pred: SymbolVar) -> tuple[tuple, np.dtype]:
        """Shape and dtype of the label input a training graph feeds: class indices by default."""
        return (None,), np.dtype(np.int64)


class CrossEntropyLoss(ILoss):
    """Cross entropy against integer class labels, from logits (default) or probabilities."""

    def __init__(
        self, with_logits: bool = True, label_smooth: float = 0.0, reduce_mode: str = "mean", axis: int = 1
    ) -> None:
        if not 0 <= label_smooth < 1:
            raise ValueError(f"label_smooth must be in [0, 1), got {label_smooth}")
        self.with_logits, self.label_smooth, self.axis = with_logits, label_smooth, axis
        self.reduce_mode = _check_mode(reduce_mode)

    def label_input(self, pred: SymbolVar) -> tuple[tuple, np.dtype]:
        axis = self.axis % pred.ndim
        return tuple(d for i, d in enumerate(pred.shape) if i != axis), np.dtype(np.int64)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        if label.dtype.kind not in "iu":
            raise ShapeError(f"CrossEntropyLoss: labels must be integer class indices, got {label.dtype}")
        log_prob = opr.log_softmax(pred, axis=self.axis) if self.with_logits else opr.log(pred)
        nll = -opr.indexing_one_hot(log_prob, label, axis=self.axis)
        if self.label_smooth:
            smooth = -opr.mean(log_prob, axis=self.axis)
            nll = nll * (1 - self.label_smooth) + smooth * self.label_smooth
        return _reduce(nll, self.reduce_mode)


class _Regression(ILoss):
    """A loss whose label has the prediction's shape and dtype."""

    def label_input(self, pred: SymbolVar) -> tuple[tuple, np.dtype]:
        return pred.shape, pred.dtype


class MSELoss(_Regression):
    def __init__(self, reduce_mode: str = "mean") -> None:
        self.reduce_mode = _check_mode(reduce_mode)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        _same_shape("MSELoss", pred, label)
        diff = pred - label
        return _reduce(diff * diff, self.reduce_mode)


class L1Loss(_Regression):
    def __init__(self, reduce_mode: str = "mean") -> None:
        self.reduce_mode = _check_mode(reduce_mode)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        _same_shape("L1Loss", pred, label)
        return _reduce(opr.abs(pred - label), self.reduce_mode)


class BCEWithLogitsLoss(_Regression):
    """Binary cross entropy on logits, in the overflow-free form max(x,0) - x*y + log(1 + exp(-|x|))."""

    def __init__(self, reduce_mode: str = "mean") -> None:
        self.reduce_mode = _check_mode(reduce_mode)

    def __call__(self, pred: SymbolVar, label: SymbolVar) -> SymbolVar:
        _same_shape("BCEWithLogitsLoss", pred, label)
        values = opr.relu(pred) - pred * label + opr.log(1.0 + opr.exp(-opr.abs(pred)))
        return _reduce(values, self.reduce_mode)


LOSSES = {"cross_entropy": CrossEntropyLoss, "mse": MSELoss, "l1": L1Loss, "bce_with_logits": BCEWithLogitsLoss}

"""Optimizers insert their update rule into the graph (MegEngine's `IOptimizer` / `Optimizer`).

`make(weight, grad, graph)` returns the weight's update node; the optimizer's own state
(momentum, Adam moments, step counts) lives in shared tensors whose updates are attached
to the nodes that compute them, so compiling the weight updates brings them along.
The rules match PyTorch's `torch.optim.SGD` and `torch.optim.Adam` step for step.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from . import opr
from .graph import ComputingGraph, GraphError, SymbolVar


class IOptimizer(ABC):
    @abstractmethod
    def make_multiple(
        self, weights: Sequence[SymbolVar], grads: Sequence[SymbolVar], graph: ComputingGraph
    ) -> list[SymbolVar]:
        """Update nodes for many weights."""

    @abstractmethod
    def make(self, weight: SymbolVar, grad: SymbolVar, graph: ComputingGraph) -> SymbolVar:
        """The update node for one weight."""


class Optimizer(IOptimizer):
    """Implements `make_multiple` by `make` per weight; subclasses write `make`.

    The learning rate is a shared scalar per graph, so `set_lr` changes it without recompiling.
    """

    def __init__(self, lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.lr = float(lr)
        self._lr_vars: list[SymbolVar] = []
        self.state: dict[str, SymbolVar] = {}  # name -> shared state tensor (saved with checkpoints)

    def make_multiple(
        self, weights: Sequence[SymbolVar], grads: Sequence[SymbolVar], graph: ComputingGraph
    ) -> list[SymbolVar]:
        weights, grads = list(weights), list(grads)
        if len(weights) != len(grads):
            raise GraphError(f"make_multiple: {len(weights)} weights but {len(grads)} gradients")
        return [self.make(w, g, graph) for w, g in zip(weights, grads, strict=True)]

    def fresh(self) -> Optimizer:
        """The same optimizer (settings and learning rate) with no state in any graph yet."""
        other = copy.copy(self)
        other._lr_vars, other.state = [], {}
        return other

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)
        for var in self._lr_vars:
            var.value[...] = lr

    def lr_var(self, graph: ComputingGraph) -> SymbolVar:
        """The shared scalar that holds the learning rate in `graph` (the ONNX step's `lr` input)."""
        return self._lr(graph)

    def _lr(self, graph: ComputingGraph) -> SymbolVar:
        for var in self._lr_vars:  # one lr per optimizer and graph; another optimizer keeps its own
            if var.graph is graph:
                return var
        name, k = f"{type(self).__name__.lower()}.lr", 1
        while name in graph:
            name, k = f"{type(self).__name__.lower()}.lr.{k}", k + 1
        var = opr.shared(graph, np.asarray(self.lr, np.float32), name, trainable=False)
        self._lr_vars.append(var)
        return var

    def _state(self, graph: ComputingGraph, weight: SymbolVar, kind: str, value: np.ndarray) -> SymbolVar:
        name = f"{weight.name}.{kind}"
        var = opr.shared(graph, value, name, trainable=False)
        self.state[name] = var
        return var

    @staticmethod
    def _check(weight: SymbolVar, grad: SymbolVar) -> None:
        if not isinstance(weight.op, opr.SharedDeviceTensor):
            raise GraphError(f"optimizer: {weight!r} is not a shared tensor and cannot be updated")
        if grad.shape != weight.shape:
            raise GraphError(f"optimizer: gradient shape {grad.shape} differs from weight {weight.name} {weight.shape}")


def _attach(anchor: SymbolVar, *updates: SymbolVar) -> SymbolVar:
    anchor.side_updates.extend(updates)
    return anchor


class SGD(Optimizer):
    """torch.optim.SGD (dampening 0): g += wd*w; buf = m*buf + g; step = g + m*buf (nesterov) or buf."""

    def __init__(self, lr: float, weight_decay: float = 0.0, momentum: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(lr)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov needs momentum > 0")
        self.weight_decay, self.momentum, self.nesterov = weight_decay, momentum, nesterov

    def make(self, weight: SymbolVar, grad: SymbolVar, graph: ComputingGraph) -> SymbolVar:
        self._check(weight, grad)
        g = grad + weight * self.weight_decay if self.weight_decay else grad
        if self.momentum:
            buf = self._state(graph, weight, "momentum", np.zeros(weight.shape, weight.dtype))
            new_buf = buf * self.momentum + g  # zero start == PyTorch's "buf = g" on the first step
            _attach(new_buf, opr.add_update(buf, new_buf, alpha=0.0))
            g = g + new_buf * self.momentum if self.nesterov else new_buf
        return opr.add_update(weight, -self._lr(graph) * g)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient, optional AMSGrad)."""

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(lr)
        self.weight_decay, self.betas, self.eps, self.amsgrad = weight_decay, tuple(betas), eps, amsgrad
        self.decoupled_decay = 0.0

    def make(self, weight: SymbolVar, grad: SymbolVar, graph: ComputingGraph) -> SymbolVar:
        self._check(weight, grad)
        b1, b2 = self.betas
        g = grad + weight * self.weight_decay if self.weight_decay else grad
        zeros = np.zeros(weight.shape, weight.dtype)
        m = self._state(graph, weight, "exp_avg", zeros)
        v = self._state(graph, weight, "exp_avg_sq", zeros)
        step = self._state(graph, weight, "step", np.zeros((), weight.dtype))
        new_step = step + 1.0
        new_m = m * b1 + g * (1 - b1)
        new_v = v * b2 + g * g * (1 - b2)
        _attach(new_step, opr.add_update(step, 1.0))
        _attach(new_m, opr.add_update(m, new_m, alpha=0.0))
        _attach(new_v, opr.add_update(v, new_v, alpha=0.0))
        second = new_v
        if self.amsgrad:  # keep the running maximum of v (the buffer MegEngine's version got wrong)
            v_max = self._state(graph, weight, "max_exp_avg_sq", zeros)
            second = opr.maximum(v_max, new_v)
            _attach(second, opr.add_update(v_max, second, alpha=0.0))
        bias1 = 1.0 - opr.pow(new_step.make_scalar(b1), new_step)
        bias2 = 1.0 - opr.pow(new_step.make_scalar(b2), new_step)
        denom = opr.sqrt(second) / opr.sqrt(bias2) + self.eps
        lr = self._lr(graph)
        step_ = -(lr / bias1) * new_m / denom
        if self.decoupled_decay:  # AdamW: w <- w - lr*wd*w, then the Adam step (from the old w's gradient)
            step_ = step_ - (lr * self.decoupled_decay) * weight
        return opr.add_update(weight, step_)


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the weight, not added to the gradient."""

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
    ) -> None:
        super().__init__(lr, 0.0, betas, eps, amsgrad)
        self.decoupled_decay = float(weight_decay)


OPTIMIZERS = ("sgd", "sgd-momentum", "adam", "adamw")


def make_optimizer(name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0) -> Optimizer:
    """An optimizer by its command-line name: sgd, sgd-momentum, adam or adamw."""
    if name == "sgd":
        return SGD(lr, weight_decay=weight_decay)
    if name == "sgd-momentum":
        return SGD(lr, weight_decay=weight_decay, momentum=momentum)
    if name == "adam":
        return Adam(lr, weight_decay=weight_decay)
    if name == "adamw":
        return AdamW(lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


def clip_by_global_norm(grads: Sequence[SymbolVar], max_norm: float, eps: float = 1e-6) -> list[SymbolVar]:
    """The gradients scaled by min(1, max_norm / (norm + eps)), norm over all of them together
    (torch.nn.utils.clip_grad_norm_): one large gradient cannot blow up a step."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    grads = list(grads)
    total = opr.sum(grads[0] * grads[0])
    for g in grads[1:]:
        total = total + opr.sum(g * g)
    norm = opr.sqrt(total) + eps
    coefficient = opr.clip(norm.make_scalar(max_norm) / norm, high=1.0)
    return [g * coefficient for g in grads]


# ----- learning-rate schedules: lr as a function of the training step (Trainer calls set_lr) -----


class Schedule(ABC):
    @abstractmethod
    def __call__(self, step: int) -> float:
        """The learning rate for training step `step` (0 first)."""


class StepLR(Schedule):
    """lr * gamma ** (step // step_size) (torch.optim.lr_scheduler.StepLR, counted in steps)."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1) -> None:
        if step_size < 1 or not gamma > 0:
            raise ValueError(f"StepLR: step_size must be >= 1 and gamma > 0, got {step_size}, {gamma}")
        self.lr, self.step_size, self.gamma = lr, step_size, gamma

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)


class CosineLR(Schedule):
    """Cosine from lr down to min_lr over total_steps, then min_lr (CosineAnnealingLR)."""

    def __init__(self, lr: float, total_steps: int, min_lr: float = 0.0) -> None:
        if total_steps < 1:
            raise ValueError(f"CosineLR: total_steps must be >= 1, got {total_steps}")
        self.lr, self.total_steps, self.min_lr = lr, total_steps, min_lr

    def __call__(self, step: int) -> float:
        t = min(step, self.total_steps) / self.total_steps
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + np.cos(np.pi * t))


class Warmup(Schedule):
    """Linear warm-up over the first `steps` steps (from lr/steps up), then `after`."""

    def __init__(self, after: Schedule, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"Warmup: steps must be >= 1, got {steps}")
        self.after, self.steps = after, steps

    def __call__(self, step: int) -> float:
        return self.after(step) * min(1.0, (step + 1) / self.steps)

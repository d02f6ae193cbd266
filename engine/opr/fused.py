"""`FusedElemwise`: a small tree of elementwise operators run as one instruction.

Made only by the compiler's `fuse_elementwise` pass (never saved in a model file). Each step
is an ordinary operator (add, relu, the optimizer's arithmetic, AddUpdate...) run through its
own kernel, so the fused result is bit for bit the unfused one; what fusion saves is the
instruction dispatch and the intermediate buffers: a step writes straight into the output
whenever that cannot clobber something a later step still reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..graph import GraphError
from .base import Operator, Workspace


@dataclass(frozen=True)
class Step:
    op: Operator
    args: tuple[tuple[str, int], ...]  # ("in", i): the fused node's i-th input; ("step", k): step k's result
    dtype: np.dtype


def _broadcast(shapes: list[tuple]) -> tuple:
    """numpy's broadcasting rule on shape tuples (np.broadcast_shapes builds arrays to do it)."""
    ndim = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes]):
        sizes = {d for d in dims if d != 1}
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


class FusedElemwise(Operator):
    elementwise = True  # every step is elementwise, so the output may overwrite a same-shaped input

    def __init__(self, steps: Sequence[Step]) -> None:
        super().__init__(steps=list(steps))
        last = len(self.steps) - 1
        # After step k, is any fused input still read? Then step k must not write the output
        # (the planner may have given the output an input's buffer).
        reads_input_after = [
            any(kind == "in" for s in self.steps[k + 1 :] for kind, _ in s.args) for k in range(len(self.steps))
        ]
        # Step k's result lives until its last reader.
        last_read = {k: k for k in range(len(self.steps))}
        for j, step in enumerate(self.steps):
            for kind, k in step.args:
                if kind == "step":
                    last_read[k] = j
        self._may_use_out = [k == last or not reads_input_after[k] for k in range(len(self.steps))]
        # per step: a ufunc to call directly (most steps), else the operator's own kernel
        self._calls = [
            (getattr(s.op, "ufunc", None), getattr(s.op, "extra", ()), s.op.forward_into, s.args) for s in self.steps
        ]
        self._last_read = last_read

    def infer(self, *inputs):
        raise GraphError("FusedElemwise is made by the compiler, not added to graphs")

    def forward(self, *xs):
        values: list[np.ndarray] = []
        for step in self.steps:
            values.append(step.op.forward(*[xs[i] if kind == "in" else values[i] for kind, i in step.args]))
        return values[-1]

    def forward_into(self, ws: Workspace, out: np.ndarray, *xs: np.ndarray) -> None:
        self.bind(ws, out, *xs)(*xs)

    def bind(self, ws: Workspace, out: np.ndarray, *xs: np.ndarray):
        targets = self._targets(ws, out, [x.shape for x in xs])  # where each step writes
        calls = []
        for (ufunc, extra, forward_into, args), target in zip(self._calls, targets):
            refs = [(kind == "in", i) for kind, i in args]
            if ufunc is not None:
                calls.append((ufunc, refs, extra, target))
            else:
                calls.append((None, refs, forward_into, target))
        last = targets[-1]

        def run(*xs):
            values: list[np.ndarray] = []
            for ufunc, refs, extra, target in calls:
                args = [xs[i] if fed else values[i] for fed, i in refs]
                if ufunc is not None:
                    ufunc(*args, *extra, out=target)
                else:
                    extra(ws, target, *args)
                values.append(target)
            if last is not out:  # the last step's shape may be broadcast to out's only at the end
                np.copyto(out, last)

        return run

    def _targets(self, ws: Workspace, out: np.ndarray, in_shapes: list[tuple]) -> list[np.ndarray]:
        shapes: list[tuple] = []
        targets: list[np.ndarray] = []
        in_out: int | None = None  # the step whose result sits in `out`
        for k, step in enumerate(self.steps):
            shape = _broadcast([in_shapes[i] if kind == "in" else shapes[i] for kind, i in step.args])
            free = in_out is None or self._last_read[in_out] <= k
            if self._may_use_out[k] and free and shape == out.shape and step.dtype == out.dtype:
                targets.append(out)
                in_out = k
            else:
                targets.append(ws.get(f"step{k}", shape, step.dtype))
            shapes.append(shape)
        return targets

    def key(self):  # made per program; never merged with another
        return (self.type_name, id(self))

    def __repr__(self) -> str:
        return "FusedElemwise(" + " -> ".join(s.op.type_name for s in self.steps) + ")"

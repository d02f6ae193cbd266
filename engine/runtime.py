"""Run a compiled program: `func.execute(...)` is one step (MegEngine's `func->execute()`).

Every value gets a slot; instructions read input slots and fill their output slot. Feeds
are checked against the shapes the graph was built with. Updates are written into the
shared tensors after all instructions ran, so every reader saw the old value.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from .compiler.program import Program
from .graph import GraphError


class CompiledFunction:
    def __init__(self, program: Program, single_output: bool = False, profile: bool = False) -> None:
        self.program = program
        self.single_output = single_output
        self.profile = profile
        self.op_seconds: dict[str, float] = defaultdict(float)
        self.op_calls: dict[str, int] = defaultdict(int)
        slot = {id(n): i for i, n in enumerate(program.nodes)}
        self._n_slots = len(program.nodes)
        self._instructions = []  # (kernel, input slots, output slot, type name)
        self._constants: list[tuple[int, Any]] = []  # (slot, holder of .value: SymbolVar or Node)
        self._feeds: dict[str, tuple[int, Any]] = {}  # name -> (slot, origin var)
        for i, node in enumerate(program.nodes):
            if node.kind == "input":
                self._feeds[node.origin.name] = (i, node.origin)
            elif node.kind == "shared":
                self._constants.append((i, node.origin))
            elif node.kind == "const":
                self._constants.append((i, node))
            else:
                self._instructions.append((node.op.forward, [slot[id(x)] for x in node.inputs], i, node.op.type_name))
        self._outputs = [slot[id(n)] for n in program.outputs]
        self._updates = [(dest, slot[id(n)]) for dest, n in program.updates]

    @property
    def input_names(self) -> list[str]:
        return list(self._feeds)

    def _check_feed(self, name: str, value: Any, var: Any) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype != var.dtype:
            if array.dtype.kind != var.dtype.kind and not (array.dtype.kind in "iu" and var.dtype.kind in "iu"):
                raise GraphError(f"input {name!r}: expected {var.dtype}, got {array.dtype}")
            array = array.astype(var.dtype)
        if array.ndim != len(var.shape) or any(d is not None and d != a for d, a in zip(var.shape, array.shape)):
            shown = tuple("?" if d is None else d for d in var.shape)
            raise GraphError(f"input {name!r}: expected shape {shown}, got {array.shape}")
        return array

    def execute(self, feeds: Mapping[str, Any] | None = None, **kw_feeds: Any) -> Any:
        """Run one step. Inputs by name (dict or keywords); returns the outputs as numpy arrays."""
        given = {**(feeds or {}), **kw_feeds}
        missing = [n for n in self._feeds if n not in given]
        extra = [n for n in given if n not in self._feeds]
        if missing or extra:
            raise GraphError(f"execute: missing inputs {missing}, unknown inputs {extra}; "
                             f"this function takes {list(self._feeds)}")
        values: list[Any] = [None] * self._n_slots
        for name, (i, var) in self._feeds.items():
            values[i] = self._check_feed(name, given[name], var)
        for i, holder in self._constants:
            values[i] = holder.value
        if self.profile:
            for kernel, ins, out, type_name in self._instructions:
                start = time.perf_counter()
                values[out] = kernel(*[values[j] for j in ins])
                self.op_seconds[type_name] += time.perf_counter() - start
                self.op_calls[type_name] += 1
        else:
            for kernel, ins, out, _ in self._instructions:
                values[out] = kernel(*[values[j] for j in ins])
        results = [np.array(values[i], copy=True) for i in self._outputs]
        for dest, i in self._updates:
            np.copyto(dest.value, values[i])
        return results[0] if self.single_output else results

    __call__ = execute

    def explain(self) -> str:
        """What the compiler did and what runs, for debugging."""
        lines = [f"{len(self._instructions)} kernels, {len(self._updates)} updates, "
                 f"mode={'train' if self.program.training else 'eval'}", *self.program.notes]
        return "\n".join(lines)

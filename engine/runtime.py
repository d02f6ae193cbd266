"""Run a compiled program: `func.execute(...)` is one step (MegEngine's `func->execute()`).

Every value gets a slot; instructions read input slots and fill their output slot. Feeds
are checked against the shapes the graph was built with. Updates are written into the
shared tensors after all instructions ran, so every reader saw the old value.

With the memory_plan pass (on by default) the first step for each set of input shapes runs
allocating and records every value's shape; from then on kernels write into buffers of one
arena planned by liveness (engine/compiler/memory.py), views of those buffers are made once,
and scratch space lives in per-instruction workspaces: a steady-state step allocates only
the copies of the outputs it returns. A new batch size gets its own plan (a few are cached).
Update chains grouped by the flat_updates pass run last, one flat kernel per group
(engine/compiler/updates.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from .compiler import compile_graph
from .compiler.memory import Instruction, MemoryPlan, plan
from .compiler.passes import NON_DETERMINISTIC
from .compiler.program import Node, Program
from .compiler.updates import FlatUpdateRunner
from .graph import ComputingGraph, GraphError, SymbolVar
from .opr.base import Workspace

MAX_PLANS = 4  # shape signatures kept (e.g. full batches and the last, smaller one)

# How an instruction runs under a plan (FOLDED: not at all, its value is the plan's constant).
INTO, VIEW, FIXED_VIEW, ALLOC, FOLDED = "into", "view", "fixed_view", "alloc", "folded"


class _BindOnFirstCall:
    """An instruction's kernel, bound (`Operator.bind`) on its first call with that step's inputs:
    binding makes the scratch arrays, and at plan time the allocating step's values are still
    alive, so binding then would add every workspace to the peak."""

    __slots__ = ("op", "ws", "out", "kernel")

    def __init__(self, op: Any, ws: Workspace, out: np.ndarray) -> None:
        self.op, self.ws, self.out, self.kernel = op, ws, out, None

    def __call__(self, *xs: Any) -> None:
        if self.kernel is None:
            self.kernel = self.op.bind(self.ws, self.out, *xs)
        self.kernel(*xs)


def _pick(k: int) -> Any:
    """A kernel that returns its k-th input itself (an instruction the plan found to be a copy)."""
    return lambda *xs: xs[k]


@dataclass
class StepPlan:
    memory: MemoryPlan
    template: list[Any]  # slot -> planned buffer or fixed view (None where filled per step)
    steps: list[tuple[str, Any, list[int], int, str]]  # (how, kernel, input slots, output slot, type)
    workspaces: list[Workspace]
    cache: dict = field(default_factory=dict)  # anything else worked out once for this plan
    calls: list[tuple[Any, Any, bool, int | None]] = field(init=False)  # what a step runs (see _make_calls)

    bound: bool = field(init=False, default=False)  # every kernel bound (after the first planned step)

    def __post_init__(self) -> None:
        self._make_calls()

    def drop_binders(self) -> None:
        """Put each bound kernel in its binder's place, so later steps call it directly."""
        self.steps = [
            (how, kernel.kernel if isinstance(kernel, _BindOnFirstCall) else kernel, ins, out, name)
            for how, kernel, ins, out, name in self.steps
        ]
        self._make_calls()
        self.bound = True

    def _make_calls(self) -> None:
        # (kernel, one C-level getter of the input values, several inputs?, output slot or None)
        self.calls = [
            (kernel, itemgetter(*ins) if ins else (lambda values: ()), len(ins) != 1, None if how is INTO else out)
            for how, kernel, ins, out, _ in self.steps
            if how is not FIXED_VIEW and how is not FOLDED
        ]

    @property
    def workspace_bytes(self) -> int:
        return sum(ws.nbytes for ws in self.workspaces)

    @property
    def allocating_kernels(self) -> list[str]:
        return [type_name for how, _, _, _, type_name in self.steps if how == ALLOC]


def compile_function(
    graph: ComputingGraph,
    outputs: list[SymbolVar],
    updates: list[SymbolVar],
    training: bool,
    single_output: bool = False,
    profile: bool = False,
    **options: Any,
) -> CompiledFunction:
    """What `graph.compile` does once it has checked its arguments: passes, then a function."""
    program = compile_graph(graph, outputs, updates, training=training, **options)
    return CompiledFunction(program, single_output=single_output, profile=profile)


class CompiledFunction:
    def __init__(self, program: Program, single_output: bool = False, profile: bool = False) -> None:
        self.program = program
        self.single_output = single_output
        self.profile = profile
        self.op_seconds: dict[str, float] = defaultdict(float)
        self.op_calls: dict[str, int] = defaultdict(int)
        self.profiled_steps = 0
        slot = {id(n): i for i, n in enumerate(program.nodes)}
        self._n_slots = len(program.nodes)
        self._nodes: list[Node] = []  # the op nodes, in execution order
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
                self._nodes.append(node)
                self._instructions.append((node.op.forward, [slot[id(x)] for x in node.inputs], i, node.op.type_name))
        self._outputs = [slot[id(n)] for n in program.outputs]
        self._updates = [(dest, slot[id(n)]) for dest, n in program.updates]
        self._flat = FlatUpdateRunner(program.flat_updates, slot) if program.flat_updates else None
        self._unplanned_cache: dict = {}
        self._aliased: dict[tuple, list[bool]] = {}  # input signature -> which update values need a copy
        self._plans: dict[tuple, StepPlan] = {}
        self.last_shapes: dict[int, tuple] = {}  # slot -> shape, from the last unplanned step

    def _check_feed(self, name: str, value: Any, var: Any) -> np.ndarray:
        array = np.asarray(value)
        if array.dtype != var.dtype:
            if array.dtype.kind != var.dtype.kind and not (array.dtype.kind in "iu" and var.dtype.kind in "iu"):
                raise GraphError(f"input {name!r}: expected {var.dtype}, got {array.dtype}")
            array = array.astype(var.dtype)
        if array.ndim != len(var.shape) or any(d is not None and d != a for d, a in zip(var.shape, array.shape)):
            shown = "(" + ", ".join("?" if d is None else str(d) for d in var.shape) + ")"
            raise GraphError(f"input {name!r}: expected shape {shown} (? = any size), got {array.shape}")
        return array

    # ----- one step -----
    def execute(self, feeds: Mapping[str, Any] | None = None, **kw_feeds: Any) -> Any:
        """Run one step. Inputs by name (dict or keywords); returns the outputs as numpy arrays."""
        given = {**(feeds or {}), **kw_feeds}
        missing = [n for n in self._feeds if n not in given]
        extra = [n for n in given if n not in self._feeds]
        if missing or extra:
            raise GraphError(
                f"execute: missing inputs {missing}, unknown inputs {extra}; this function takes {list(self._feeds)}"
            )
        fed = [(i, self._check_feed(name, given[name], var)) for name, (i, var) in self._feeds.items()]
        signature = tuple((a.shape, a.dtype.str) for _, a in fed)
        step = self._plans.get(signature) if self.program.plan_memory else None
        values: list[Any] = [None] * self._n_slots if step is None else step.template.copy()
        for i, array in fed:
            values[i] = array
        for i, holder in self._constants:
            values[i] = holder.value
        if step is None:
            self._run_allocating(values)
            if self.program.plan_memory:
                self._remember(signature, self._make_plan(values))
        elif self.profile:
            self._run_planned_profiled(step, values)
        else:
            for kernel, get, several, out in step.calls:
                if out is None:
                    kernel(*get(values)) if several else kernel(get(values))
                else:
                    values[out] = kernel(*get(values)) if several else kernel(get(values))
            if not step.bound:
                step.drop_binders()
        self.profiled_steps += bool(self.profile)
        results = [np.array(values[i], copy=True) for i in self._outputs]
        self._write_updates(values, signature)
        if self._flat is not None:
            start = time.perf_counter() if self.profile else 0.0
            self._flat.run(
                values, self._unplanned_cache if step is None else step.cache, {} if step is None else step.memory.flat
            )
            if self.profile:
                self.op_seconds["FlatUpdate"] += time.perf_counter() - start
                self.op_calls["FlatUpdate"] += len(self._flat.groups)
        return results[0] if self.single_output else results

    def _write_updates(self, values: list[Any], signature: tuple) -> None:
        """Write every update's new value into its shared tensor, as if all were written at once.

        A new value may alias another update's destination (e.g. `anchor <- w` beside `w <- w - g`);
        those are copied before the first write. Which ones alias is fixed per input signature.
        """
        aliased = self._aliased.get(signature)
        if aliased is None:
            dests = [d.value for d, _ in self._updates]
            aliased = [
                any(np.may_share_memory(values[i], other) for other in dests if other is not dest.value)
                for dest, i in self._updates
            ]
            self._aliased[signature] = aliased
        staged = [values[i].copy() if copy else values[i] for (_, i), copy in zip(self._updates, aliased)]
        for (dest, _), value in zip(self._updates, staged):
            np.copyto(dest.value, value)

    __call__ = execute

    def _run_allocating(self, values: list[Any]) -> None:
        for kernel, ins, out, type_name in self._instructions:
            start = time.perf_counter() if self.profile else 0.0
            values[out] = kernel(*[values[j] for j in ins])
            if self.profile:
                self.op_seconds[type_name] += time.perf_counter() - start
                self.op_calls[type_name] += 1

    def _run_planned_profiled(self, step: StepPlan, values: list[Any]) -> None:
        for how, kernel, ins, out, type_name in step.steps:
            start = time.perf_counter()
            if how is INTO:
                kernel(*[values[j] for j in ins])
            elif how is not FIXED_VIEW and how is not FOLDED:
                values[out] = kernel(*[values[j] for j in ins])
            self.op_seconds[type_name] += time.perf_counter() - start
            self.op_calls[type_name] += 1

    # ----- planning -----
    def _remember(self, signature: tuple, step: StepPlan) -> None:
        if len(self._plans) >= MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[signature] = step

    def _plan_constants(self, values: list[Any]) -> set[int]:
        """Slots whose value is the same every step under one plan: computed only from constants
        and from inputs read for their shape alone (the mean's 1/N, a loss gradient's seed
        broadcast to the batch). The allocating step computed them; the plan keeps those values."""
        constant = {i for i, holder in self._constants if isinstance(holder, Node)}
        folded: set[int] = set()
        for node, (_, ins, out, _) in zip(self._nodes, self._instructions):
            shape_only = node.op.shape_only_inputs
            if isinstance(node.op, NON_DETERMINISTIC) or not isinstance(values[out], np.ndarray):
                continue
            if all(k in shape_only or j in constant for k, j in enumerate(ins)):
                constant.add(out)
                folded.add(out)
        return folded

    def _make_plan(self, values: list[Any]) -> StepPlan:
        """Plan from an allocating step's values: their shapes, and which results were views."""
        self.last_shapes = {i: np.shape(v) for i, v in enumerate(values)}
        view_of: dict[int, list[int]] = {}  # a kernel that does not write into a buffer may return a view
        buffers: dict[int, tuple[tuple, np.dtype]] = {}
        instructions = []
        folded = self._plan_constants(values)
        grouped = {s for group in (self._flat.contiguous() if self._flat else ()) for s in group}
        passed: dict[int, int] = {}  # slot -> the input slot it is (the kernel would only copy it)
        for node, (_, ins, out, _) in zip(self._nodes, self._instructions):
            if out in folded:
                continue
            through = node.op.passes_through(*[values[j] for j in ins]) if out not in grouped else None
            if through is not None and np.shape(values[ins[through]]) == np.shape(values[out]):
                passed[out] = ins[through]
                view_of[out] = [ins[through]]
            elif node.op.writes_into():
                result = np.asarray(values[out])
                buffers[out] = (result.shape, result.dtype)
            else:
                view_of[out] = list(ins)  # of any input, as far as lifetimes go
            instructions.append(Instruction(ins, out, [k for k in node.inplace if ins[k] in buffers]))
        kept = [*self._outputs, *(i for _, i in self._updates), *(self._flat_slots())]
        memory = plan(instructions, buffers, view_of, kept, self._flat.contiguous() if self._flat else ())

        template: list[Any] = [None] * self._n_slots
        for s, array in memory.arrays.items():
            template[s] = array
        steps, workspaces = [], []
        for node, (kernel, ins, out, type_name) in zip(self._nodes, self._instructions):
            if out in folded:
                template[out] = values[out]
                steps.append((FOLDED, kernel, ins, out, type_name))
                continue
            if out in passed:
                source = passed[out]
                if template[source] is not None:
                    template[out] = template[source]
                    steps.append((FIXED_VIEW, kernel, ins, out, type_name))
                else:
                    steps.append((VIEW, _pick(ins.index(source)), ins, out, type_name))
                continue
            if out in memory.arrays:
                ws = Workspace()
                workspaces.append(ws)
                steps.append((INTO, _BindOnFirstCall(node.op, ws, memory.arrays[out]), ins, out, type_name))
                continue
            # A view of planned memory only (not of a feed or a fresh array) is the same view every
            # step: make it now. Only kernels that returned a view in the first step are re-run here
            # (running others could advance state, such as a dropout mask's random generator).
            found = values[out]
            was_view = isinstance(found, np.ndarray) and any(
                isinstance(values[j], np.ndarray) and np.may_share_memory(found, values[j]) for j in ins
            )
            if not was_view:
                steps.append((ALLOC, kernel, ins, out, type_name))
                continue
            result = kernel(*[template[j] if template[j] is not None else values[j] for j in ins])
            shares = [
                template[j] is not None
                for j in ins
                if isinstance(result, np.ndarray)
                and np.may_share_memory(result, values[j] if template[j] is None else template[j])
            ]
            if shares and all(shares):
                template[out] = result
                steps.append((FIXED_VIEW, kernel, ins, out, type_name))
            else:
                steps.append((VIEW, kernel, ins, out, type_name))
        return StepPlan(memory, template, steps, workspaces)

    def _flat_slots(self) -> list[int]:
        slot = {id(n): i for i, n in enumerate(self.program.nodes)}
        return [slot[id(n)] for n in self.program.flat_inputs()]

    def release(self) -> None:
        """Drop every plan (arenas, workspaces, cached views): the memory a finished job held.

        The function stays usable; its next step plans again, as the first one did. The device
        agent calls this when a round is done, so a phone does not keep a round's buffers.
        """
        self._plans.clear()
        self._aliased.clear()
        self._unplanned_cache.clear()
        self.last_shapes = {}

    # ----- inspection -----
    @property
    def plans(self) -> list[StepPlan]:
        return list(self._plans.values())

    def profile_report(self) -> str:
        """Where the profiled steps' time went, per operator type (set `profile = True` first)."""
        steps = max(self.profiled_steps, 1)
        total = sum(self.op_seconds.values()) or 1e-12
        rows = [f"{'operator':<28}{'ms/step':>9}{'calls':>7}{'share':>8}"]
        for name, sec in sorted(self.op_seconds.items(), key=lambda kv: -kv[1]):
            rows.append(f"{name:<28}{sec / steps * 1e3:>9.3f}{self.op_calls[name] // steps:>7}{sec / total:>8.1%}")
        rows.append(f"{'kernels total':<28}{total / steps * 1e3:>9.3f}   over {self.profiled_steps} steps")
        return "\n".join(rows)

    def explain(self) -> str:
        """What the compiler did, what runs and how memory is planned, for debugging."""
        flat = sum(len(g.dests) for g in self.program.flat_updates)
        lines = [
            f"{len(self._instructions)} kernels, {len(self._updates) + flat} updates ({flat} in flat kernels), "
            f"mode={'train' if self.program.training else 'eval'}",
            *self.program.notes,
        ]
        for signature, step in self._plans.items():
            shapes = ", ".join(str(s) for s, _ in signature)
            m = step.memory
            lines.append(
                f"plan for inputs {shapes}: arena {m.arena_bytes / 1e6:.2f} MB for "
                f"{m.unplanned_bytes / 1e6:.2f} MB of values ({len(m.blocks)} blocks, {m.inplace} in place), "
                f"workspaces {step.workspace_bytes / 1e6:.2f} MB, "
                f"{sum(s[0] is FOLDED for s in step.steps)} kernels folded into plan constants, "
                f"allocating kernels: {step.allocating_kernels or 'none'}"
            )
        return "\n".join(lines)

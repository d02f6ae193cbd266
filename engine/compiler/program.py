"""The compiler's working copy of a graph: the nodes one function runs, in execution order.

`build_program` copies the part of the user's graph that the outputs and updates need,
resolving train/eval switches and collecting attached updates on the way. Passes then
rewrite this copy freely; the user's graph (shared by other compiled functions) is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..graph import GraphError, SymbolVar
from ..opr.base import Operator
from ..opr.io import ImmutableTensor
from ..opr.nn import ModeSelect
from ..opr.update import AddUpdate


@dataclass(eq=False)
class Node:
    op: Operator
    inputs: list[Node]
    shape: tuple
    dtype: np.dtype
    origin: SymbolVar | None = None  # the user's var (sources read their value through it)
    value: np.ndarray | None = None  # for constants
    inplace: tuple[int, ...] = ()  # inputs whose buffer the output may take over (set by the inplace pass)

    @property
    def kind(self) -> str:
        """ "input", "shared" or "const" for a source (its `SourceKind`), else "op"."""
        source = self.op.source_kind
        return "op" if source is None else source.value

    def __repr__(self) -> str:
        return f"Node({self.op!r}, shape={self.shape})"


@dataclass
class Program:
    nodes: list[Node]  # topological order
    outputs: list[Node]
    updates: list[tuple[SymbolVar, Node]]  # (shared destination, node computing its new value)
    training: bool
    notes: list[str] = field(default_factory=list)  # what each pass did, for `explain()`
    plan_memory: bool = False  # set by the memory_plan pass: the runtime runs in planned buffers
    flat_updates: list = field(default_factory=list)  # FlatUpdate groups (compiler/updates.py), run after updates

    def replace(self, mapping: dict[int, Node]) -> None:
        """Point every use of a replaced node (by id) at its replacement, then drop the unused.
        Replacements may read other replaced nodes; they are re-pointed too."""
        if not mapping:
            return

        def final(node: Node) -> Node:
            while id(node) in mapping and mapping[id(node)] is not node:
                node = mapping[id(node)]
            return node

        for node in [*self.nodes, *mapping.values()]:
            node.inputs = [final(i) for i in node.inputs]
        self.outputs = [final(n) for n in self.outputs]
        self.updates = [(d, final(n)) for d, n in self.updates]
        for group in self.flat_updates:
            group.leaves = [
                (kind, [final(n) for n in ref] if kind == "member" else final(ref) if kind == "scalar" else ref)
                for kind, ref in group.leaves
            ]
        self.reorder()

    def readers(self) -> dict[int, list[Node]]:
        """id(node) -> the nodes that read it (once per reading node)."""
        out: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for node in self.nodes:
            for i in {id(x): x for x in node.inputs}.values():
                out[id(i)].append(node)
        return out

    def root_ids(self) -> set[int]:
        """Values the caller sees: outputs and update values must keep their own buffers."""
        return {id(n) for n in self.roots()}

    def roots(self) -> list[Node]:
        return self.outputs + [n for _, n in self.updates] + self.flat_inputs()

    def flat_inputs(self) -> list[Node]:
        """Nodes the flat update groups read at the end of the step."""
        found: list[Node] = []
        for group in self.flat_updates:
            for kind, ref in group.leaves:
                found.extend(ref if kind == "member" else [ref] if kind == "scalar" else [])
        return found

    def reorder(self) -> None:
        """Keep only nodes the roots need, in a valid execution order."""
        self.nodes = topological(self.roots())


def topological(roots: Iterable[Node]) -> list[Node]:
    order: list[Node] = []
    state: dict[int, int] = {}  # id -> 1 visiting, 2 done
    for root in roots:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            key = id(node)
            if expanded:
                state[key] = 2
                order.append(node)
                continue
            if state.get(key):
                continue
            state[key] = 1
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(node.inputs) if not state.get(id(i)))
    return order


def build_program(outputs: Sequence[SymbolVar], updates: Sequence[SymbolVar], training: bool) -> Program:
    copies: dict[int, Node] = {}

    def resolve(var: SymbolVar) -> SymbolVar:
        while isinstance(var.op, ModeSelect):
            var = var.inputs[0] if training else var.inputs[1]
        return var

    pending_updates: list[SymbolVar] = list(updates)
    seen_updates: set[int] = set()

    def copy(root: SymbolVar) -> Node:
        stack = [resolve(root)]
        while stack:
            var = stack[-1]
            if var.id in copies:
                stack.pop()
                continue
            missing = [r for r in map(resolve, var.inputs) if r.id not in copies]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            copies[var.id] = Node(
                var.op,
                [copies[resolve(i).id] for i in var.inputs],
                var.shape,
                var.dtype,
                origin=var,
                value=var.value if isinstance(var.op, ImmutableTensor) else None,
            )
            pending_updates.extend(u for u in var.side_updates if u.id not in seen_updates)
        return copies[resolve(root).id]

    out_nodes = [copy(v) for v in outputs]
    update_pairs: list[tuple[SymbolVar, Node]] = []
    while pending_updates:
        up = pending_updates.pop(0)
        if up.id in seen_updates:
            continue
        seen_updates.add(up.id)
        if not isinstance(up.op, AddUpdate):
            raise GraphError(f"updates must be AddUpdate nodes (from an optimizer or opr.add_update), got {up!r}")
        update_pairs.append((up.inputs[0], copy(up)))
    dests = [d.id for d, _ in update_pairs]
    if len(dests) != len(set(dests)):
        raise GraphError("two updates write the same shared tensor in one function")
    program = Program([], out_nodes, update_pairs, training)
    program.reorder()
    return program

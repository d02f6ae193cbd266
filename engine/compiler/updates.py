"""`flat_updates`: run an optimizer's per-weight update arithmetic once, over all weights.

An optimizer adds the same small elementwise chain for every weight (SGD momentum:
buf <- buf*m + g; w <- w + (-lr)*buf). At small batches running it ten times as ten tiny
kernels, then copying every new value into its shared tensor, costs more than the
arithmetic. This pass finds update chains with identical structure, and the runtime runs
each such group as one FusedElemwise over flat arrays, in place:

  - shared tensors a group reads or writes (weights, momentum) become views of one flat
    arena (their `.value` arrays are replaced once, when the function is made);
  - values the chains read that instructions compute (gradients) get one contiguous block
    in the memory plan;
  - scalars (learning rate, constants) are read as they are.

Elementwise arithmetic over concatenated arrays is the per-weight arithmetic, so results
are bit for bit the same. Groups run after every instruction, after outputs are copied and
after the other updates are written, so every reader still sees the pre-step values; the
pass only groups chains that do not read a value another group or update overwrites first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..graph import SymbolVar
from ..opr.base import Workspace
from ..opr.fused import FusedElemwise, Step
from ..opr.update import AddUpdate
from .program import Node, Program, topological

MEMBER, SCALAR, GROUP = "member", "scalar", "group"


@dataclass(eq=False)
class FlatUpdate:
    """One group: `kernel` run over flat inputs writes the new values of `dests` (in order).

    `leaves[p]` is the kernel's p-th input: (MEMBER, nodes one per dest), (SCALAR, node), or
    (GROUP, index of an earlier group whose freshly written dests this input reads)."""

    dests: list[SymbolVar]
    kernel: FusedElemwise
    leaves: list[tuple[str, object]]

    @property
    def size(self) -> int:
        return sum(int(np.prod(d.shape, dtype=np.int64)) for d in self.dests)


def _structural_key(op) -> tuple:
    if isinstance(op, AddUpdate):  # its key() is per node; here only the arithmetic matters
        return (AddUpdate, op.alpha, op.beta, op.bias)
    return op.key()


def _chain(root: Node, readers: dict[int, list[Node]], roots: set[int]) -> list[Node] | None:
    """The elementwise nodes computing `root` that nothing else reads, in execution order."""
    if not _elementwise(root):
        return None
    members, stack, seen = [], [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        members.append(node)
        stack.extend(
            x
            for x in node.inputs
            if x.kind == "op" and _elementwise(x) and id(x) not in roots and len(readers[id(x)]) == 1
        )
    order = {id(n): k for k, n in enumerate(topological([root]))}
    return sorted(members, key=lambda n: order[id(n)])


def _elementwise(node: Node) -> bool:
    return isinstance(node.op, AddUpdate) or (node.op.elementwise and node.op.writes_into())


def _describe(dest: SymbolVar, root: Node, chain: list[Node]):
    """(signature, steps, leaves) of one update chain, or None when it cannot be flattened."""
    position = {id(n): k for k, n in enumerate(chain)}
    leaves: list[Node] = []
    steps, signature = [], [dest.dtype.str]
    for node in chain:
        if node.shape != dest.shape and node.shape != ():
            return None
        args = []
        for x in node.inputs:
            if id(x) in position:
                args.append(("step", position[id(x)]))
                continue
            if not any(x is leaf for leaf in leaves):
                if x.shape == dest.shape and x.dtype == dest.dtype and x.kind in ("op", "shared"):
                    signature.append(("member", x.dtype.str))
                elif x.shape == () and x.kind in ("op", "shared", "const"):
                    key = ("const", x.value.dtype.str, x.value.tobytes()) if x.kind == "const" else id(x)
                    signature.append(("scalar", key))
                else:
                    return None
                leaves.append(x)
            args.append(("in", next(k for k, leaf in enumerate(leaves) if leaf is x)))
        steps.append(Step(node.op, tuple(args), node.dtype))
        signature.append((_structural_key(node.op), tuple(args), node.dtype.str))
    return tuple(signature), steps, leaves


def flat_updates(program: Program) -> None:
    readers = program.readers()
    roots = program.root_ids()
    output_ids = {id(n) for n in program.outputs}
    candidates: dict[tuple, list[tuple[SymbolVar, Node, list[Step], list[Node]]]] = {}
    for dest, node in program.updates:
        if id(node) in output_ids or node.shape != dest.shape or None in dest.shape or dest.shape == ():
            continue
        chain = _chain(node, readers, roots)
        described = chain and _describe(dest, node, chain)
        if described:
            signature, steps, leaves = described
            candidates.setdefault(signature, []).append((dest, node, steps, leaves))
    groups = [members for members in candidates.values() if len(members) >= 2]
    update_dests = {d.id for d, _ in program.updates}
    while groups:  # drop groups that cannot run safely until the rest can
        plans = [_leaves(g, groups, readers, update_dests) for g in range(len(groups))]
        unsafe = [g for g, plan in enumerate(plans) if plan is None]
        if unsafe:
            groups = [m for g, m in enumerate(groups) if g not in unsafe]
            continue
        order = _order(plans)
        if order is not None:
            break
        groups = groups[:-1]
    if not groups:
        return
    renumber = {g: k for k, g in enumerate(order)}
    flat = []
    for g in order:
        leaves = [(kind, renumber[ref] if kind == GROUP else ref) for kind, ref in plans[g]["leaves"]]
        flat.append(FlatUpdate([d for d, _, _, _ in groups[g]], FusedElemwise(groups[g][0][2]), leaves))
    removed = {id(node) for members in groups for _, node, _, _ in members}
    program.updates = [(d, n) for d, n in program.updates if id(n) not in removed]
    program.flat_updates = flat
    program.reorder()
    program.notes.append(
        f"flat_updates: {len(removed)} update chains run as {len(flat)} flat kernel(s) "
        f"over {sum(f.size for f in flat)} values"
    )


def _leaves(g: int, groups, readers, update_dests) -> dict | None:
    """How group g's kernel gets each input and which groups must run before it; None if unsafe."""
    members = groups[g]
    grouped_roots = {id(node): (h, k) for h, ms in enumerate(groups) for k, (_, node, _, _) in enumerate(ms)}
    flat_dests = {dest.id: h for h, ms in enumerate(groups) for dest, _, _, _ in ms}
    leaves, before, after = [], set(), set()
    for p in range(len(members[0][3])):
        nodes = [m[3][p] for m in members]
        first = nodes[0]
        owners = [grouped_roots.get(id(n)) for n in nodes]
        if first.shape == () and first.shape != members[0][0].shape:
            if first.kind == "shared" and first.origin.id in update_dests:
                return None  # a scalar some update rewrites
            leaves.append((SCALAR, first))
        elif (
            None not in owners
            and len({h for h, _ in owners}) == 1
            and [k for _, k in owners] == list(range(len(nodes)))
            and all(len(readers[id(n)]) == 1 for n in nodes)
        ):
            before.add(owners[0][0])  # the new values another group writes: read them after it ran
            leaves.append((GROUP, owners[0][0]))
        else:
            for n, (dest, _, _, _) in zip(nodes, members):
                if n.kind == "shared" and n.origin.id in update_dests and n.origin is not dest:
                    if n.origin.id not in flat_dests:
                        return None  # a plain update writes it before the groups run
                    after.add(flat_dests[n.origin.id])  # read the old value before that group writes it
            leaves.append((MEMBER, nodes))
    if g in before:
        return None
    return {"leaves": leaves, "before": before, "after": after - {g}}


def _order(plans: Sequence[dict]) -> list[int] | None:
    """Groups in an order that meets every before/after constraint (None: there is none)."""
    deps = {g: set(p["before"]) for g, p in enumerate(plans)}
    for g, p in enumerate(plans):
        for h in p["after"]:
            deps[h].add(g)
    order: list[int] = []
    while len(order) < len(plans):
        ready = [g for g in deps if g not in order and deps[g] <= set(order)]
        if not ready:
            return None
        order.append(ready[0])
    return order


# ----- running the groups (used by engine/runtime.py) -----


def flat_view(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """One 1-D array covering `arrays` when they lie end to end in one buffer (else None)."""
    first = arrays[0]
    base = first.base if first.base is not None else first
    if base.ndim != 1 or not base.flags.c_contiguous:
        return None
    item = first.dtype.itemsize
    start = address = first.__array_interface__["data"][0]
    for a in arrays:
        if (
            a.dtype != first.dtype
            or not a.flags.c_contiguous
            or (a.base if a.base is not None else a) is not base
            or a.__array_interface__["data"][0] != address
        ):
            return None
        address += a.nbytes
    offset = (start - base.__array_interface__["data"][0]) // item
    return base[offset : offset + (address - start) // item]


def _parts(flat: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
    parts, start = [], 0
    for shape in shapes:
        n = int(np.prod(shape, dtype=np.int64))
        parts.append(flat[start : start + n].reshape(shape))
        start += n
    return parts


class FlatUpdateRunner:
    """Runs a program's FlatUpdate groups at the end of a step, in place where it can.

    Shared tensors that the graph's pool laid out end to end (engine/opr/io.py) are read and
    written as one flat view; anything else is copied into a flat buffer first (and new values
    copied out), which gives the same results, only slower."""

    def __init__(self, groups: list[FlatUpdate], slot_of: dict[int, int]) -> None:
        self.groups = groups
        self.slot_of = slot_of

    def contiguous(self) -> list[list[int]]:
        """Slot groups the memory plan should lay end to end (values instructions compute)."""
        return [
            [self.slot_of[id(n)] for n in ref]
            for group in self.groups
            for kind, ref in group.leaves
            if kind == MEMBER and all(n.kind == "op" for n in ref)
        ]

    def run(self, values: list, cache: dict, flat: dict[tuple, np.ndarray]) -> None:
        """One step's groups; `cache` keeps the bindings for one memory plan, `flat` its flat arrays."""
        bound = cache.get("flat_updates")
        if bound is None or any(v.value is not a for v, a in bound[1]):  # a shared tensor was replaced
            bound = cache["flat_updates"] = self._bind(flat)
            cache["flat_kernels"] = [None] * len(self.groups)  # each bound at its first run with these
        results: list[np.ndarray] = []
        kernels = cache["flat_kernels"]
        for k, (group, (ws, inputs, out, scatter)) in enumerate(zip(self.groups, bound[0])):
            xs = []
            for kind, a, b in inputs:
                if kind == "slot":
                    xs.append(values[a])
                elif kind == "group":
                    xs.append(results[a])
                elif kind == "gather":
                    for s, part in zip(a, b[1]):
                        np.copyto(part, values[s])
                    xs.append(b[0])
                else:
                    xs.append(a)
            if kernels[k] is None:
                kernels[k] = group.kernel.bind(ws, out, *xs)
            kernels[k](*xs)
            for var, part in scatter:  # destinations not laid out end to end: write each one
                np.copyto(var.value, part)
            results.append(out)

    def _bind(self, flat: dict[tuple, np.ndarray]) -> tuple[list, list]:
        bound, watched = [], []
        for group in self.groups:
            inputs = []
            for kind, ref in group.leaves:
                if kind == SCALAR:
                    inputs.append(("slot", self.slot_of[id(ref)], None))
                    continue
                if kind == GROUP:
                    inputs.append(("group", ref, None))
                    continue
                slots = tuple(self.slot_of[id(n)] for n in ref)
                view = flat.get(slots)
                if view is None and all(n.kind == "shared" for n in ref):
                    view = flat_view([n.origin.value for n in ref])
                    watched.extend((n.origin, n.origin.value) for n in ref)
                if view is not None:
                    inputs.append(("fixed", view, None))
                else:  # no common flat home: copy them into one each step
                    buffer = np.empty(sum(int(np.prod(n.shape, dtype=np.int64)) for n in ref), ref[0].dtype)
                    inputs.append(("gather", list(slots), (buffer, _parts(buffer, [n.shape for n in ref]))))
            out = flat_view([d.value for d in group.dests])
            watched.extend((d, d.value) for d in group.dests)
            scatter = []
            if out is None:
                out = np.empty(group.size, group.dests[0].dtype)
                scatter = list(zip(group.dests, _parts(out, [d.shape for d in group.dests])))
            bound.append((Workspace(), inputs, out, scatter))
        return bound, watched

"""Graph rewrites run at compile time, each a function Program -> None (in place), each
switchable by name so a result can be checked with and without it:
`graph.compile(..., passes=[...])` picks them; the default runs all, in `PASSES` order."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..opr.io import ImmutableTensor
from ..opr.nn import DropoutMask
from ..opr.update import AddUpdate
from .fusion import fuse_elementwise, pool_relu_backward, softmax_cross_entropy
from .lowering import share_im2col
from .program import Node, Program
from .updates import flat_updates

NON_DETERMINISTIC = (DropoutMask, AddUpdate)  # never folded or merged
_MAX_FOLD_ELEMENTS = 1 << 16  # don't bake large tensors produced from constants into the program


def constant_folding(program: Program) -> None:
    """Evaluate, once, every operator whose inputs are all constants."""
    folded: dict[int, Node] = {}
    for node in program.nodes:
        inputs = [folded.get(id(i), i) for i in node.inputs]
        if node.kind != "op" or isinstance(node.op, NON_DETERMINISTIC) or not inputs:
            continue
        if all(i.kind == "const" for i in inputs):
            value = np.asarray(node.op.forward(*[i.value for i in inputs]))
            if value.size <= _MAX_FOLD_ELEMENTS:
                folded[id(node)] = Node(ImmutableTensor(), [], value.shape, value.dtype, value=value)
    program.replace(folded)
    if folded:
        program.notes.append(f"constant_folding: folded {len(folded)} nodes")


def dead_code(program: Program) -> None:
    """Drop nodes no output or update needs (build_program already starts from the roots)."""
    before = len(program.nodes)
    program.reorder()
    if len(program.nodes) != before:
        program.notes.append(f"dead_code: removed {before - len(program.nodes)} nodes")


def common_subexpressions(program: Program) -> None:
    """Merge nodes that compute the same operator on the same inputs (and equal small constants)."""
    canonical: dict[tuple, Node] = {}
    mapping: dict[int, Node] = {}
    for node in program.nodes:
        node.inputs = [mapping.get(id(i), i) for i in node.inputs]
        if node.kind == "const":
            if node.value.size > 64:
                continue
            key = ("const", node.value.dtype.str, node.value.shape, node.value.tobytes())
        elif node.kind == "op" and not isinstance(node.op, NON_DETERMINISTIC):
            key = (node.op.key(), tuple(id(i) for i in node.inputs))
        else:
            continue
        if key in canonical:
            mapping[id(node)] = canonical[key]
        else:
            canonical[key] = node
    program.replace(mapping)
    if mapping:
        program.notes.append(f"common_subexpressions: merged {len(mapping)} nodes")


def direct_updates(program: Program) -> None:
    """An update that only stores a value (AddUpdate alpha=0, beta=1, bias=0, same shape and
    dtype: the optimizer's new momentum) needs no copy kernel: store the value itself."""
    changed = 0
    for k, (dest, node) in enumerate(program.updates):
        op = node.op
        if isinstance(op, AddUpdate) and (op.alpha, op.beta, op.bias) == (0, 1, 0):
            delta = node.inputs[1]
            # (a source would be read after other updates wrote it: keep those copied in the kernel)
            if (
                delta.kind == "op"
                and delta.shape == node.shape
                and None not in delta.shape
                and delta.dtype == node.dtype
            ):
                program.updates[k] = (dest, delta)
                changed += 1
    if changed:
        program.reorder()
        program.notes.append(f"direct_updates: {changed} updates store their value without a copy kernel")


def inplace(program: Program) -> None:
    """Let an elementwise node write over an input that nobody else reads: mark the candidates.

    The memory plan confirms each one with concrete shapes (same shape and dtype, input not a
    view, input's last use is this node) and then gives both values one buffer."""
    readers = program.readers()
    roots = program.root_ids()
    marked = 0
    for node in program.nodes:
        if node.kind != "op" or not (node.op.elementwise and node.op.writes_into()):
            continue
        node.inplace = tuple(
            k
            for k, x in enumerate(node.inputs)
            if x.kind == "op"
            and id(x) not in roots
            and len(readers[id(x)]) == 1
            and x.dtype == node.dtype
            and len(x.shape) == len(node.shape)
        )
        marked += bool(node.inplace)
    if marked:
        program.notes.append(f"inplace: {marked} nodes may overwrite an input")


def memory_plan(program: Program) -> None:
    """Run in buffers planned by liveness at the first execute for each input shape
    (engine/compiler/memory.py); without this pass every step allocates its values."""
    program.plan_memory = True


PASSES: dict[str, Callable[[Program], None]] = {
    "constant_folding": constant_folding,
    "common_subexpressions": common_subexpressions,
    "softmax_cross_entropy": softmax_cross_entropy,
    "share_im2col": share_im2col,
    "pool_relu_backward": pool_relu_backward,
    "direct_updates": direct_updates,
    "flat_updates": flat_updates,
    "fuse_elementwise": fuse_elementwise,
    "dead_code": dead_code,
    "inplace": inplace,
    "memory_plan": memory_plan,
}
DEFAULT_PASSES = tuple(PASSES)

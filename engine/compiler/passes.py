"""Graph rewrites run at compile time, each a function Program -> None (in place), each
switchable by name so a result can be checked with and without it."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .program import Node, Program

_NON_DETERMINISTIC = {"DropoutMask", "AddUpdate"}
_MAX_FOLD_ELEMENTS = 1 << 16  # don't bake large tensors produced from constants into the program


def _replace(program: Program, mapping: dict[int, Node]) -> None:
    """Point every use of a replaced node at its replacement."""
    if not mapping:
        return
    for node in program.nodes:
        node.inputs = [mapping.get(id(i), i) for i in node.inputs]
    program.outputs = [mapping.get(id(n), n) for n in program.outputs]
    program.updates = [(d, mapping.get(id(n), n)) for d, n in program.updates]
    program.reorder()


def constant_folding(program: Program) -> None:
    """Evaluate, once, every operator whose inputs are all constants."""
    folded: dict[int, Node] = {}
    for node in program.nodes:
        inputs = [folded.get(id(i), i) for i in node.inputs]
        if node.kind != "op" or node.op.type_name in _NON_DETERMINISTIC or not inputs:
            continue
        if all(i.kind == "const" for i in inputs):
            value = np.asarray(node.op.forward(*[i.value for i in inputs]))
            if value.size <= _MAX_FOLD_ELEMENTS:
                from ..opr.io import ImmutableTensor
                folded[id(node)] = Node(ImmutableTensor(), [], value.shape, value.dtype, value=value)
    _replace(program, folded)
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
        elif node.kind == "op" and node.op.type_name not in _NON_DETERMINISTIC:
            key = (node.op.key(), tuple(id(i) for i in node.inputs))
        else:
            continue
        if key in canonical:
            mapping[id(node)] = canonical[key]
        else:
            canonical[key] = node
    _replace(program, mapping)
    if mapping:
        program.notes.append(f"common_subexpressions: merged {len(mapping)} nodes")


PASSES: dict[str, Callable[[Program], None]] = {
    "constant_folding": constant_folding,
    "common_subexpressions": common_subexpressions,
    "dead_code": dead_code,
}
DEFAULT_PASSES = tuple(PASSES)

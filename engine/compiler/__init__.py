"""Compile: graph -> program -> passes. The runtime turns the program into a function."""

from __future__ import annotations

from collections.abc import Sequence

from ..graph import ComputingGraph, GraphError, SymbolVar
from .passes import DEFAULT_PASSES, PASSES
from .program import Node, Program, build_program


def compile_graph(
    graph: ComputingGraph,
    outputs: Sequence[SymbolVar],
    updates: Sequence[SymbolVar],
    training: bool,
    passes: Sequence[str] | None = None,
) -> Program:
    chosen = DEFAULT_PASSES if passes is None else tuple(passes)
    unknown = [p for p in chosen if p not in PASSES]
    if unknown:
        raise GraphError(f"unknown compiler pass(es) {unknown}; known: {sorted(PASSES)}")
    program = build_program(outputs, updates, training)
    for name in chosen:
        PASSES[name](program)
    return program


__all__ = ["compile_graph", "Program", "Node", "PASSES", "DEFAULT_PASSES"]

"""Rewrites that merge several nodes into one kernel: elementwise chains, the backward of
softmax cross-entropy, and max-pooling's backward through a ReLU. All keep results bit for bit
(see tests/test_engine_compiler.py)."""

from __future__ import annotations

from ..opr.elemwise import Mul, ReluGrad, Sub
from ..opr.fused import FusedElemwise, Step
from ..opr.nn import ExpOf, IndexingOneHotGrad, LogSoftmax, SoftmaxCrossEntropyGrad
from ..opr.pooling import MaxPoolReluBackward, Pooling, PoolingBackward
from ..opr.reduce import Sum
from ..opr.update import AddUpdate
from .program import Node, Program


def _fusable(node: Node) -> bool:
    op = node.op
    return node.kind == "op" and op.elementwise and op.writes_into()


def fuse_elementwise(program: Program) -> None:
    """Merge each elementwise producer into its only reader (bias-add + relu, the optimizer's
    momentum and step arithmetic, the update itself) so the chain runs as one instruction."""
    readers = program.readers()
    roots = program.root_ids()
    order = {id(n): k for k, n in enumerate(program.nodes)}
    group: dict[int, list[Node]] = {}  # id(node) -> members of the fused group it ends (topological order)
    for node in program.nodes:
        if not (_fusable(node) or isinstance(node.op, AddUpdate)):
            continue
        members: list[Node] = []
        for inp in {id(i): i for i in node.inputs}.values():
            if _fusable(inp) and id(inp) not in roots and len(readers[id(inp)]) == 1:
                members.extend(group.pop(id(inp), [inp]))
        if members:
            group[id(node)] = sorted(members, key=lambda m: order[id(m)]) + [node]
    mapping = {root_id: _fused_node(members) for root_id, members in group.items()}
    program.replace(mapping)
    if mapping:
        sizes = sorted((len(m.op.steps) for m in mapping.values()), reverse=True)
        program.notes.append(
            f"fuse_elementwise: {len(mapping)} fused kernels from {sum(sizes)} nodes (largest {sizes[0]})"
        )


def _fused_node(members: list[Node]) -> Node:
    position = {id(m): k for k, m in enumerate(members)}
    inputs: list[Node] = []
    steps = []
    for member in members:
        args = []
        for x in member.inputs:
            if id(x) in position:
                args.append(("step", position[id(x)]))
            else:
                if not any(x is i for i in inputs):
                    inputs.append(x)
                args.append(("in", next(k for k, i in enumerate(inputs) if i is x)))
        steps.append(Step(member.op, tuple(args), member.dtype))
    root = members[-1]
    return Node(FusedElemwise(steps), inputs, root.shape, root.dtype, origin=root.origin)


def softmax_cross_entropy(program: Program) -> None:
    """Replace autodiff's backward of -indexing_one_hot(log_softmax(x), label):

        sub(G, mul(exp_of(L), sum(G, axis, keepdims)))  with  G = indexing_one_hot_grad(D, label, L)

    by one SoftmaxCrossEntropyGrad(L, label, D): sum(G) along the axis is exactly D (one
    non-zero per row), so the result is D*onehot - softmax*D in both forms, bit for bit."""
    readers = program.readers()
    roots = program.root_ids()
    mapping: dict[int, Node] = {}
    for node in program.nodes:
        if not isinstance(node.op, Sub):
            continue
        g, m = node.inputs
        if not isinstance(g.op, IndexingOneHotGrad) or not isinstance(m.op, Mul):
            continue
        e, t = m.inputs
        if not isinstance(e.op, ExpOf) or not isinstance(t.op, Sum) or t.inputs[0] is not g:
            continue
        d, label, log_p = g.inputs
        axis = g.op.axis
        if (
            e.inputs[0] is not log_p
            or not isinstance(log_p.op, LogSoftmax)
            or log_p.op.axis % len(log_p.shape) != axis
            or list(t.op.axes) != [axis]
            or not t.op.keepdims
        ):
            continue
        private = [g, m, e, t]
        if (
            any(id(x) in roots for x in private)
            or len(readers[id(g)]) != 2
            or any(len(readers[id(x)]) != 1 for x in (m, e, t))
        ):
            continue
        mapping[id(node)] = Node(
            SoftmaxCrossEntropyGrad(axis=axis), [log_p, label, d], node.shape, node.dtype, origin=node.origin
        )
    program.replace(mapping)
    if mapping:
        program.notes.append(f"softmax_cross_entropy: fused {len(mapping)} backward(s) into one kernel")


_POOL_GEOMETRY = ("mode", "window", "stride", "padding")


def pool_relu_backward(program: Program) -> None:
    """Replace ReluGrad(y, PoolingBackward(y, dout)), tiled max pooling of a ReLU's output y, by
    one MaxPoolReluBackward(y, pooled, dout) that reads the forward pooling's maxima `pooled`
    instead of recomputing them, and masks dout per window instead of the full gradient."""
    readers = program.readers()
    roots = program.root_ids()
    forwards: dict[tuple, Node] = {}
    for node in program.nodes:
        if isinstance(node.op, Pooling):
            forwards[(id(node.inputs[0]), *(repr(node.op.attrs[k]) for k in _POOL_GEOMETRY))] = node
    mapping: dict[int, Node] = {}
    for node in program.nodes:
        if not isinstance(node.op, ReluGrad):
            continue
        y, back = node.inputs
        if not isinstance(back.op, PoolingBackward) or back.inputs[0] is not y or back.op.mode != "max":
            continue
        if not back.op.tiled or id(back) in roots or len(readers[id(back)]) != 1:
            continue
        pooled = forwards.get((id(y), *(repr(back.op.attrs[k]) for k in _POOL_GEOMETRY)))
        if pooled is None or y.dtype != node.dtype:
            continue
        geometry = {k: back.op.attrs[k] for k in _POOL_GEOMETRY}
        mapping[id(node)] = Node(
            MaxPoolReluBackward(**geometry), [y, pooled, back.inputs[1]], node.shape, node.dtype, origin=node.origin
        )
    program.replace(mapping)
    if mapping:
        program.notes.append(f"pool_relu_backward: {len(mapping)} max-pool backward(s) merged with their ReLU's")

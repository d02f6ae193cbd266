"""Each compiler pass keeps results identical: outputs and updated weights with it on and off,
on LeNet training and on seeded random graphs. Also the memory plan's placement rules."""

from __future__ import annotations

import numpy as np
import pytest

from engine import ComputingGraph, grad, opr
from engine.compiler import DEFAULT_PASSES, PASSES
from engine.compiler.memory import Block, Instruction, place, plan
from engine.graph import GraphError
from engine.loss import CrossEntropyLoss
from engine.models.lenet import build_lenet
from engine.optimizer import SGD, Adam


def lenet_training(passes, optimizer=None, batches=((8, 0), (8, 1), (3, 2), (8, 3))):
    """Train LeNet a few steps (batch sizes change, so plans are remade); return every result."""
    model = build_lenet(seed=1)
    graph = model.graph
    label = opr.host2device(graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    weights = list(model.params.values())
    updates = (optimizer or SGD(0.05, momentum=0.9)).make_multiple(weights, grad(loss, weights), graph)
    func = graph.compile([loss, model.output], updates=updates, passes=passes)
    results = []
    for n, seed in batches:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, n)
        results.extend(func.execute(x=x, label=y))
    return results + [v.copy() for v in model.state_dict().values()], func


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(u, v, err_msg=f"result {i} differs")


@pytest.fixture(scope="module")
def lenet_reference():
    return lenet_training(passes=())[0]


def test_default_passes_are_all_of_them():
    assert set(DEFAULT_PASSES) == set(PASSES)
    with pytest.raises(GraphError, match="unknown compiler pass"):
        ComputingGraph().compile([], passes=["no_such_pass"])


@pytest.mark.parametrize("name", list(PASSES))
def test_each_pass_alone_keeps_lenet_training_identical(name, lenet_reference):
    passes = (name, "inplace", "memory_plan") if name == "fuse_elementwise" else (name,)
    assert_same(lenet_training(passes)[0], lenet_reference)


@pytest.mark.parametrize("name", list(PASSES))
def test_all_passes_but_one_keep_lenet_training_identical(name, lenet_reference):
    assert_same(lenet_training([p for p in DEFAULT_PASSES if p != name])[0], lenet_reference)


def test_all_passes_with_adam_identical():
    batches = ((4, 0), (4, 1), (4, 2))
    assert_same(lenet_training(None, Adam(0.01), batches)[0], lenet_training((), Adam(0.01), batches)[0])


def test_passes_really_rewrite_lenet():
    _, func = lenet_training(None, batches=((8, 0), (8, 1)))
    names = [n.op.type_name for n in func.program.nodes]
    assert "SoftmaxCrossEntropyGrad" in names and "IndexingOneHotGrad" not in names
    assert "FusedElemwise" in names and "Relu" not in names  # every relu went into a bias-add kernel
    assert names.count("MaxPoolReluBackward") == 2 and "PoolingBackward" not in names
    assert "memory plan" not in func.explain() and "arena" in func.explain()
    (step,) = func.plans
    assert step.memory.inplace > 0 and step.allocating_kernels == []
    assert step.memory.arena_bytes < step.memory.unplanned_bytes


# ----- seeded random graphs -----

UNARY = [opr.relu, opr.tanh, opr.neg, opr.sigmoid, opr.abs, lambda v: opr.exp(opr.tanh(v))]
BINARY = [opr.add, opr.sub, opr.mul, opr.maximum]


def random_graph(seed: int):
    """A small random model: shared weights, a fed batch, elementwise chains with broadcasting,
    matmuls, reductions, repeated subexpressions and constants; trained with SGD momentum."""
    rng = np.random.default_rng(seed)
    g = ComputingGraph()
    x = opr.host2device(g, (None, 4), "float32", "x")
    w = [opr.shared(g, rng.standard_normal((4, 4)).astype(np.float32) * 0.4, f"w{i}") for i in range(2)]
    b = opr.shared(g, rng.standard_normal((4,)).astype(np.float32), "b")
    values = [x, opr.matrix_mul(x, w[0]), x * 2.0 + b]
    for _ in range(int(rng.integers(4, 10))):
        kind = rng.integers(0, 5)
        a = values[int(rng.integers(len(values)))]
        if kind == 0:
            values.append(UNARY[int(rng.integers(len(UNARY)))](a))
        elif kind == 1:
            other = values[int(rng.integers(len(values)))]
            values.append(opr.tanh(BINARY[int(rng.integers(len(BINARY)))](a, other)))
        elif kind == 2:
            values.append(a + b * float(rng.uniform(0.5, 2)))  # broadcast a weight
        elif kind == 3:
            values.append(opr.tanh(opr.matrix_mul(a, w[int(rng.integers(2))], transpose_b=bool(rng.integers(2)))))
        else:
            values.append(opr.relu(a) + opr.relu(a))  # the same subexpression twice
    out = values[-1]
    loss = opr.mean(out * out) + opr.sum(opr.mean(values[len(values) // 2], axis=0)) * 0.1
    params = [*w, b]
    updates = SGD(0.01, momentum=0.5).make_multiple(params, grad(loss, params), g)
    return g, loss, out, params, updates


def run_random(seed: int, passes):
    """Four steps (the batch size changes once, so a second plan is made); every result."""
    g, loss, out, params, updates = random_graph(seed)
    func = g.compile([loss, out], updates=updates, passes=passes)
    results = []
    for n in (5, 5, 2, 5):
        xs = np.random.default_rng(seed * 100 + n).standard_normal((n, 4)).astype(np.float32)
        results.extend(func.execute(x=xs))
    results += [p.value.copy() for p in params]
    assert all(np.isfinite(r).all() for r in results)
    return results


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_identical_with_each_pass_on_and_off(seed):
    reference = run_random(seed, ())
    assert_same(run_random(seed, None), reference)
    for name in PASSES:
        assert_same(run_random(seed, [p for p in DEFAULT_PASSES if p != name]), reference)


def test_eval_function_shares_weights_with_training_function():
    model = build_lenet(seed=2)
    evaluate = model.graph.compile([model.output], training=False)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    first = evaluate.execute(x=x)[0]
    assert_same([evaluate.execute(x=x)[0]], [first])  # the planned step gives the allocating step's bits
    model.params["fc3.bias"].value += 1.0
    np.testing.assert_allclose(evaluate.execute(x=x)[0], first + 1.0, rtol=1e-6, atol=1e-6)


# ----- memory plan -----


def test_blocks_alive_together_never_share_bytes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        blocks = []
        for _ in range(12):
            start = int(rng.integers(0, 20))
            blocks.append(
                Block((int(rng.integers(1, 300)),), np.dtype(np.float32), start, start + int(rng.integers(0, 6)))
            )
        total = place(blocks)
        for i, a in enumerate(blocks):
            assert a.offset % 64 == 0 and a.offset + a.nbytes <= total
            for b in blocks[i + 1 :]:
                if a.overlaps(b):
                    assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset


def test_dead_buffers_are_reused_and_inplace_takes_over_its_input():
    f32 = np.dtype(np.float32)
    # 0 -> 1 -> 2 -> 3 in a chain of same-shaped values; 3 may overwrite 2
    insts = [Instruction([0], 1), Instruction([1], 2), Instruction([2], 3, inplace=[0])]
    buffers = {s: ((100,), f32) for s in (1, 2, 3)}
    memory = plan(insts, buffers, view_of={}, keep=[3])
    assert memory.arrays[3] is memory.arrays[2] and memory.inplace == 1
    assert not np.shares_memory(memory.arrays[1], memory.arrays[2])  # 1 is read while 2 is written
    assert memory.arena_bytes == 448 + 400  # two blocks for three values; the first padded to 64 bytes


def test_views_keep_their_base_alive():
    f32 = np.dtype(np.float32)
    # 2 is a view of 1; 3 reads 0; 4 reads the view 2 late: 1 must stay alive while 3 is written
    insts = [Instruction([0], 1), Instruction([1], 2), Instruction([0], 3), Instruction([2, 3], 4)]
    buffers = {1: ((50,), f32), 3: ((50,), f32), 4: ((50,), f32)}
    memory = plan(insts, buffers, view_of={2: [1]}, keep=[4])
    assert not np.shares_memory(memory.arrays[1], memory.arrays[3])


# ----- operators the passes introduce -----


def test_softmax_cross_entropy_operator_value_and_gradient():
    from gradcheck import check_gradients

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 5))
    labels = np.array([0, 4, 2, 2])

    def fused(a):
        return opr.softmax_cross_entropy(a, a.graph.constant(labels))

    check_gradients(fused, [logits])
    g = ComputingGraph()
    x = opr.shared(g, logits, "x")
    label = g.constant(labels)
    both = g.compile([opr.softmax_cross_entropy(x, label), -opr.indexing_one_hot(opr.log_softmax(x, 1), label)])
    fused_value, reference = both.execute()
    np.testing.assert_allclose(fused_value, reference, rtol=1e-12)


def test_lowered_convolution_matches_the_plain_one():
    """share_im2col's split kernels give the unsplit kernels' bits, groups and strides included."""
    rng = np.random.default_rng(4)
    for kw in (dict(), dict(stride=2, padding=1), dict(groups=2, dilation=2, padding=2)):
        g = ComputingGraph()
        x = opr.shared(g, rng.standard_normal((2, 4, 9, 8)).astype(np.float32), "x")
        w = opr.shared(g, rng.standard_normal((6, 4 // kw.get("groups", 1), 3, 3)).astype(np.float32), "w")
        y = opr.convolution(x, w, **kw)
        loss = opr.sum(y * y)
        outs = [y, *grad(loss, [x, w])]
        plain = g.compile(outs, passes=[p for p in DEFAULT_PASSES if p != "share_im2col"])
        lowered = g.compile(outs)
        assert "share_im2col: 1" in "\n".join(lowered.program.notes)
        for _ in range(2):
            assert_same(lowered.execute(), plain.execute())


# ----- flat updates -----


def test_flat_updates_run_lenet_optimizer_in_place_on_laid_out_tensors():
    """SGD momentum's 20 update chains become 2 flat kernels that read and write the shared
    tensors through one view each: no gather copies, no scatter, every weight moved."""
    results, func = lenet_training(None, batches=((8, 0), (8, 1)))
    assert "flat_updates: 20 update chains run as 2 flat kernel(s)" in func.explain()
    assert func.program.updates == []
    (step,) = func.plans
    bound, _ = step.cache["flat_updates"]
    kinds = [[kind for kind, _, _ in inputs] for _, inputs, _, _ in bound]
    assert all("gather" not in k for k in kinds) and all(scatter == [] for _, _, _, scatter in bound)
    weights = [n.origin for n in func.program.nodes if n.kind == "shared" and n.origin.op.trainable]
    assert np.shares_memory(bound[1][2], weights[0].value)  # the second kernel writes the weights


def test_flat_updates_survive_a_replaced_shared_value():
    """Someone replaces a weight's array between steps: the runner notices and still writes it."""
    model = build_lenet(seed=1)
    graph = model.graph
    label = opr.host2device(graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    weights = list(model.params.values())
    func = graph.compile([loss], updates=SGD(0.05, momentum=0.9).make_multiple(weights, grad(loss, weights), graph))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 4)
    func.execute(x=x, label=y)
    func.execute(x=x, label=y)
    reference = [w.value.copy() for w in weights]
    weights[2].value = weights[2].value.copy()  # no longer laid out with the others
    func.execute(x=x, label=y)
    replaced = [w.value.copy() for w in weights]

    model2 = build_lenet(seed=1)
    g2 = model2.graph
    label2 = opr.host2device(g2, (None,), "int64", "label")
    loss2 = CrossEntropyLoss()(model2.output, label2)
    w2 = list(model2.params.values())
    plain = g2.compile(
        [loss2],
        updates=SGD(0.05, momentum=0.9).make_multiple(w2, grad(loss2, w2), g2),
        passes=[p for p in DEFAULT_PASSES if p != "flat_updates"],
    )
    for _ in range(2):
        plain.execute(x=x, label=y)
    assert_same([w.value for w in w2], reference)
    plain.execute(x=x, label=y)
    assert_same([w.value for w in w2], replaced)


def test_shared_tensors_of_one_kind_lie_end_to_end():
    from engine.compiler.updates import flat_view

    g = ComputingGraph()
    a = opr.shared(g, np.ones((2, 3), np.float32), "a")
    lr = opr.shared(g, np.float32(0.1), "lr", trainable=False)  # scalars live apart
    b = opr.shared(g, np.full(5, 2, np.float32), "b")
    m = opr.shared(g, np.zeros(4, np.float32), "a.momentum", trainable=False)
    flat = flat_view([a.value, b.value])
    np.testing.assert_array_equal(flat, [1] * 6 + [2] * 5)
    assert flat_view([b.value, a.value]) is None and flat_view([a.value, m.value]) is None
    assert lr.value.shape == () and m.value.sum() == 0


def test_memory_plan_lays_a_contiguous_group_end_to_end():
    f4 = np.dtype(np.float32)
    insts = [Instruction([], 0), Instruction([0], 1), Instruction([1], 2), Instruction([0], 3)]
    buffers = {0: ((3,), f4), 1: ((2, 2), f4), 2: ((5,), f4), 3: ((1,), f4)}
    memory = plan(insts, buffers, {}, keep=[3, 1], contiguous=[[3, 1]])
    flat = memory.flat[(3, 1)]
    assert flat.shape == (5,)
    assert np.shares_memory(flat[:1], memory.arrays[3]) and np.shares_memory(flat[1:], memory.arrays[1])
    for s in (0, 2):  # both are alive while the group is (from slot 1's write to the end)
        assert not np.shares_memory(memory.arrays[s], flat)


@pytest.mark.parametrize(
    "geometry", [dict(), dict(padding=2), dict(dilation=2, padding=1), dict(groups=2), dict(stride=(2, 1), padding=1)]
)
def test_backward_data_row_kernel_matches_the_tap_kernel(geometry):
    from engine.opr.base import Workspace
    from engine.opr.conv import ConvolutionBackwardData

    rng = np.random.default_rng(7)
    g = ComputingGraph()
    w = opr.shared(g, rng.standard_normal((6, 4 // geometry.get("groups", 1), 3, 5)).astype(np.float32), "w")
    x = opr.shared(g, rng.standard_normal((3, 4, 11, 12)).astype(np.float32), "x")
    y = opr.convolution(x, w, **geometry)
    dout = rng.standard_normal((3, 6, *y.shape[2:])).astype(np.float32)
    node = ConvolutionBackwardData.make(w, opr.shared(g, dout, "dout"), x, **geometry)
    rows, taps = np.empty(x.shape, np.float32), np.empty(x.shape, np.float32)
    node.op._rows_backward(Workspace(), rows, w.value, dout, x.value)
    node.op._taps_backward(Workspace(), taps, w.value, dout, x.value)
    np.testing.assert_allclose(rows, taps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(8, 6), (7, 9)])  # windows tiling the input, and a ragged edge
def test_pool_relu_backward_is_bit_for_bit_on_ties_signs_and_nan(hw):
    """ReLU zeros and small integers make many tied windows (the first maximum must win); dout
    carries negative values (signed zeros), NaN and inf, which must come out where they did."""
    rng = np.random.default_rng(3)
    g = ComputingGraph()
    x = opr.host2device(g, (None, 3, *hw), "float32", "x")
    d = opr.host2device(g, (None, 3, hw[0] // 2, hw[1] // 2), "float32", "d")
    y = opr.relu(x * 1.0)
    pooled = opr.pooling(y, "max", window=2)
    loss = opr.sum(pooled * d)
    (dx,) = grad(loss, [x])
    both = [g.compile([dx, pooled], passes=p) for p in (None, [p for p in DEFAULT_PASSES if p != "pool_relu_backward"])]
    assert "pool_relu_backward: 1" in both[0].explain() and "pool_relu_backward" not in both[1].explain()
    for step in range(3):  # the first step runs unplanned, the next ones in planned buffers
        xs = rng.integers(-2, 3, (4, 3, *hw)).astype(np.float32)
        ds = rng.standard_normal((4, 3, hw[0] // 2, hw[1] // 2)).astype(np.float32)
        ds[0, 0, 0, :2] = [np.nan, np.inf]
        ds[1, 1, 1, :2] = [-np.inf, -0.0]
        with np.errstate(invalid="ignore"):  # inf * 0 is NaN on both sides, as it should be
            got, want = [f.execute(x=xs, d=ds) for f in both]
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=f"step {step}")

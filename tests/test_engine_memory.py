"""Steady-state training allocates nothing that grows with the data: every value lives in
the arena planned at the first step, scratch lives in per-instruction workspaces."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from engine import grad, opr
from engine.loss import CrossEntropyLoss
from engine.models.lenet import build_lenet
from engine.opr.base import Workspace
from engine.opr.pooling import Pooling, PoolingBackward
from engine.optimizer import SGD


def lenet_train_function():
    model = build_lenet(seed=0)
    label = opr.host2device(model.graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    weights = list(model.params.values())
    updates = SGD(0.01, momentum=0.9).make_multiple(weights, grad(loss, weights), model.graph)
    return model.graph.compile([loss, model.output], updates=updates)


def batch(n: int):
    rng = np.random.default_rng(n)
    return {"x": rng.standard_normal((n, 1, 28, 28)).astype(np.float32), "label": rng.integers(0, 10, n)}


def step_growth(func, feeds) -> tuple[int, int]:
    """Peak bytes a step allocates above what was live before it, and the bytes it returns."""
    tracemalloc.start()
    try:
        func.execute(feeds)  # a first traced step (tracemalloc's own tables settle)
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        outputs = func.execute(feeds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before, sum(o.nbytes for o in outputs)


def test_lenet_training_step_allocates_nothing_in_steady_state():
    func = lenet_train_function()
    sizes = {}
    for n in (32, 64):
        feeds = batch(n)
        for _ in range(3):  # the first step plans; later ones run planned
            func.execute(feeds)
        plan = func.plans[-1]  # the plan made for this batch size
        assert plan.allocating_kernels == []
        buffers = dict(plan.memory.arrays)
        scratch = [(ws, dict(ws.arrays)) for ws in plan.workspaces]
        sizes[n] = step_growth(func, feeds)
        assert func.plans[-1] is plan and plan.memory.arrays == buffers  # same buffers, not remade
        for ws, arrays in scratch:  # same scratch arrays, not remade
            assert ws.arrays.keys() == arrays.keys() and all(ws.arrays[k] is a for k, a in arrays.items())
    # What a step allocates beyond its returned outputs does not grow with the batch: at batch
    # 64 one activation alone is 1.2 MB, here the total is numpy's fixed-size ufunc iteration
    # buffers (8192 elements for strided operands) and small Python objects.
    extra = {n: growth - returned for n, (growth, returned) in sizes.items()}
    assert extra[64] < 300_000
    assert extra[64] - extra[32] < 8_000, extra


def test_eval_function_allocates_nothing_either():
    model = build_lenet(seed=0)
    func = model.graph.compile([model.output], training=False)
    feeds = {"x": batch(64)["x"]}
    for _ in range(3):
        func.execute(feeds)
    growth, returned = step_growth(func, feeds)
    assert growth - returned < 300_000
    assert func.plans[0].allocating_kernels == []


def test_a_new_batch_size_gets_its_own_plan_and_old_plans_are_kept():
    func = lenet_train_function()
    for n in (8, 3, 8, 3):
        func.execute(batch(n))
    assert len(func.plans) == 2
    assert "plan for inputs (8, 1, 28, 28)" in func.explain() and "plan for inputs (3, 1, 28, 28)" in func.explain()


def test_arena_reuses_memory():
    func = lenet_train_function()
    for _ in range(2):
        func.execute(batch(64))
    memory = func.plans[0].memory
    # 0.91 since the plan aliases identity sums instead of copying them: five full-size values
    # fewer to place (arena 14.16 -> 13.69 MB at batch 64, arena plus workspaces 20.79 -> 20.62 MB)
    assert memory.arena_bytes < 0.93 * memory.unplanned_bytes
    assert memory.inplace >= 3  # the fc layers' ReLU gradients and the loss's negations write over their input


@pytest.mark.parametrize("mode", ["max", "average"])
def test_tiled_pooling_matches_the_general_path(mode):
    """The 2x2/stride-2 fast path against the window-view path, ties included (relu zeros)."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((3, 2, 9, 8)), 0).astype(np.float32)  # odd height: a cut row
    x[0, 0, :2, :2] = 1.5  # a window whose four entries tie
    dout = rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    fast = PoolingBackward(mode=mode, window=[2, 2], stride=[2, 2], padding=[0, 0])
    slow = PoolingBackward(mode=mode, window=[2, 2], stride=[2, 2], padding=[0, 0])
    slow.__class__ = type("Untiled", (PoolingBackward,), {"tiled": False})
    np.testing.assert_array_equal(fast.forward(x, dout), slow.forward(x, dout))
    assert fast.forward(x, dout)[0, 0, :2, :2].tolist() == [[dout[0, 0, 0, 0], 0], [0, 0]] or mode != "max"
    pool = Pooling(mode=mode, window=[2, 2], stride=[2, 2], padding=[0, 0])
    untiled = Pooling(mode=mode, window=[2, 2], stride=[2, 2], padding=[0, 0])
    untiled.__class__ = type("Untiled", (Pooling,), {"tiled": False})
    np.testing.assert_allclose(pool.forward(x), untiled.forward(x), rtol=1e-6)
    out = np.empty_like(pool.forward(x))
    pool.forward_into(Workspace(), out, x)
    np.testing.assert_array_equal(out, pool.forward(x))


def test_release_drops_every_plan_and_the_function_plans_again_with_the_same_results():
    released, kept = lenet_train_function(), lenet_train_function()
    feeds = batch(16)
    for _ in range(2):
        released.execute(feeds)
        kept.execute(feeds)
    assert len(released.plans) == 1
    released.release()
    assert released.plans == [] and "plan for inputs" not in released.explain()
    for _ in range(3):  # an allocating step, then planned ones: the same numbers as never released
        for a, b in zip(released.execute(feeds), kept.execute(feeds)):
            np.testing.assert_array_equal(a, b)
    assert len(released.plans) == 1 and released.plans[0].allocating_kernels == []

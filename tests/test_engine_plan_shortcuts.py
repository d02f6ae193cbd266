"""What a memory plan skips: kernels folded into plan constants (values computed only from constants
and input shapes), instructions that would only copy their input, and max-pool backward's one-call
routing when no window has a tie. Each is checked bit for bit against the unplanned reference."""

from __future__ import annotations

import numpy as np
import pytest

from engine import ComputingGraph, grad, opr
from engine.compiler import DEFAULT_PASSES
from engine.loss import CrossEntropyLoss
from engine.models.lenet import build_lenet
from engine.optimizer import SGD
from engine.runtime import FIXED_VIEW, FOLDED, INTO


def _lenet(passes):
    model = build_lenet(seed=2)
    label = opr.host2device(model.graph, (None,), "int64", "label")
    loss = CrossEntropyLoss()(model.output, label)
    weights = list(model.params.values())
    updates = SGD(0.05, momentum=0.9).make_multiple(weights, grad(loss, weights), model.graph)
    return model, model.graph.compile([loss, model.output], updates=updates, passes=passes)


def test_lenet_plan_folds_the_loss_seed_and_skips_identity_sums():
    model, func = _lenet(None)
    rng = np.random.default_rng(0)
    func.execute(x=rng.standard_normal((8, 1, 28, 28)).astype(np.float32), label=rng.integers(0, 10, 8))
    (step,) = func.plans
    how = {}
    for kind, _, _, _, name in step.steps:
        how.setdefault(name, []).append(kind)
    # mean's 1/N, the seed of the loss gradient broadcast to the batch, and their product
    assert how["CountRatio"] == [FOLDED] and how["BroadcastLike"] == [FOLDED]
    assert "4 kernels folded into plan constants" in func.explain()
    # (N, C...) gradients summed to (N, C...): the plan aliases them; bias gradients still reduce
    assert how["SumToShapeOf"].count(FIXED_VIEW) == 5 and how["SumToShapeOf"].count(INTO) == 5
    assert all(FOLDED not in kinds for name, kinds in how.items() if name in ("Mean", "IndexingOneHot"))


def test_plan_constants_follow_the_batch_size_and_match_the_reference():
    """Batch sizes change (a new plan each): every plan's folded 1/N must be its own."""
    results = []
    for passes in (None, ()):
        model, func = _lenet(passes)
        rng = np.random.default_rng(1)
        for n in (8, 3, 8, 1, 3):
            x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
            results.append(func.execute(x=x, label=rng.integers(0, 10, n)))
        results.append([v.copy() for v in model.state_dict().values()])
    half = len(results) // 2
    for got, want in zip(results[:half], results[half:]):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_a_folded_value_returned_as_output_is_a_copy():
    g = ComputingGraph()
    x = opr.host2device(g, (None, 3), "float32", "x")
    ratio = opr.CountRatio.make(opr.mean(x), x)  # 1/size(x): the plan folds it
    func = g.compile([ratio, opr.mean(x)])
    for _ in range(3):
        got, _ = func.execute(x=np.ones((4, 3), np.float32))
        assert got == np.float32(1 / 12)
        got[...] = 5  # the caller's copy: the plan's constant must not change
    assert func.execute(x=np.ones((2, 3), np.float32))[0] == np.float32(1 / 6)
    assert "kernels folded" in func.explain()


def _pool_relu(hw, channels, dropping=False):
    g = ComputingGraph()
    x = opr.host2device(g, (None, channels, *hw), "float32", "x")
    d = opr.host2device(g, (None, channels, hw[0] // 2, hw[1] // 2), "float32", "d")
    y = opr.relu(x * 1.0)
    pooled = opr.pooling(y, "max", window=2)
    (dx,) = grad(opr.sum(pooled * d), [x])
    other = [p for p in DEFAULT_PASSES if p != "pool_relu_backward"]
    return [g.compile([dx, pooled], passes=p) for p in (None, other)]


@pytest.mark.parametrize(
    "shape",
    [(4, 3, 8, 6), (1, 6, 28, 28), (2, 3, 7, 9), (8, 16, 10, 10), (3, 6, 28, 28)],  # ragged; short rows, many
)
def test_max_pool_relu_backward_without_ties_is_bit_for_bit(shape):
    """Continuous inputs (no tied maxima except all-zero windows), plus NaN in x and NaN, inf and
    signed zeros in dout: the one-call routing must give the tap-wise router's bits."""
    n, c, h, w = shape
    rng = np.random.default_rng(5)
    fused, reference = _pool_relu((h, w), c)
    for step in range(3):
        xs = rng.standard_normal(shape).astype(np.float32)
        xs[0, 0, :2, :2] = -1.0  # a dead window (all zeros after the ReLU): ties that must not matter
        xs[-1, -1, 2, 2] = np.nan
        ds = rng.standard_normal((n, c, h // 2, w // 2)).astype(np.float32)
        ds[0, 0, 0, :3] = [np.nan, np.inf, -0.0]
        ds[-1, 0, 1, :2] = [-np.inf, -2.0]
        with np.errstate(invalid="ignore"):
            got, want = fused.execute(x=xs, d=ds), reference.execute(x=xs, d=ds)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32), err_msg=f"step {step}")


def test_max_pool_relu_backward_with_a_positive_tie_routes_to_the_first_tap():
    fused, reference = _pool_relu((4, 4), 1)
    xs = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    xs[0, 0, 0, 1] = xs[0, 0, 1, 1] = 9.0  # window (0, 0): two taps at its maximum 9
    ds = np.arange(1, 5, dtype=np.float32).reshape(1, 1, 2, 2)
    for _ in range(2):
        got, want = fused.execute(x=xs, d=ds), reference.execute(x=xs, d=ds)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[0][0, 0, 0, 1] == 1.0 and got[0][0, 0, 1, 1] == 0.0

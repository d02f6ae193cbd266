"""Every operator's gradient against central finite differences (float64)."""

import numpy as np
import pytest
from gradcheck import check_gradients

from engine import opr

rng = np.random.default_rng(42)


def r(*shape, positive=False):
    a = rng.standard_normal(shape)
    return np.abs(a) + 0.5 if positive else a


@pytest.mark.parametrize(
    "fn,shapes",
    [
        (opr.add, [(3, 4), (4,)]),
        (opr.add, [(2, 1, 3), (1, 4, 1)]),
        (opr.sub, [(3, 4), (3, 1)]),
        (opr.mul, [(2, 3), (2, 3)]),
        (opr.mul, [(2, 3), ()]),
        (opr.maximum, [(3, 4), (3, 4)]),
    ],
)
def test_binary(fn, shapes):
    check_gradients(fn, [r(*s) for s in shapes])


def test_div_and_pow():
    check_gradients(opr.div, [r(3, 4), r(4, positive=True)])
    check_gradients(opr.pow, [r(3, 4, positive=True), r(3, 4)])
    check_gradients(lambda a: a**3.0, [r(5)])


def test_overloads_with_scalars():
    check_gradients(lambda a: (2.0 - a) * 3.0 / (a * a + 1.0) - (-a), [r(4, 3)])
    check_gradients(lambda a: 1.0 / (a + 3.0), [r(3, positive=True)])


@pytest.mark.parametrize(
    "fn,positive",
    [
        (opr.exp, False),
        (opr.log, True),
        (opr.sqrt, True),
        (opr.relu, False),
        (opr.sigmoid, False),
        (opr.tanh, False),
        (opr.abs, False),
        (opr.neg, False),
    ],
)
def test_unary(fn, positive):
    check_gradients(fn, [r(3, 5, positive=positive)])


def test_shape_ops():
    check_gradients(lambda a: opr.reshape(a, (6, -1)), [r(2, 3, 4)])
    check_gradients(lambda a: opr.flatten(a), [r(2, 3, 4)])
    check_gradients(lambda a: opr.transpose(a, (2, 0, 1)), [r(2, 3, 4)])
    check_gradients(lambda a, b: opr.concat([a, b], axis=1), [r(2, 3), r(2, 5)])


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (1, True), ((0, 2), False), (-1, True)])
def test_reductions(axis, keepdims):
    x = r(2, 3, 4)
    check_gradients(lambda a: opr.sum(a, axis, keepdims), [x])
    check_gradients(lambda a: opr.mean(a, axis, keepdims), [x])
    check_gradients(lambda a: opr.max(a, axis, keepdims), [x])


def test_matrix_mul_all_transposes():
    for ta in (False, True):
        for tb in (False, True):
            a = r(4, 3) if ta else r(3, 4)
            b = r(5, 4) if tb else r(4, 5)
            check_gradients(lambda x, y, ta=ta, tb=tb: opr.matrix_mul(x, y, ta, tb), [a, b])


def test_softmax_family_and_indexing():
    check_gradients(lambda a: opr.softmax(a, axis=1), [r(3, 5)])
    check_gradients(lambda a: opr.log_softmax(a, axis=-1), [r(3, 5)])
    check_gradients(lambda a: opr.log_softmax(a, axis=0), [r(4, 2)])

    def pick(a):
        labels = a.graph.constant(np.array([0, 4, 2]))
        return opr.indexing_one_hot(a, labels, axis=1)

    check_gradients(pick, [r(3, 5)])


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(stride=2),
        dict(padding=1),
        dict(stride=2, padding=2),
        dict(dilation=2, padding=1),
        dict(stride=(2, 1), padding=(0, 1)),
    ],
)
def test_convolution(kw):
    check_gradients(lambda x, w: opr.convolution(x, w, **kw), [r(2, 3, 7, 6), r(4, 3, 3, 3)])


def test_convolution_groups():
    check_gradients(lambda x, w: opr.convolution(x, w, groups=2, padding=1), [r(2, 4, 5, 5), r(6, 2, 3, 3)])
    check_gradients(lambda x, w: opr.convolution(x, w, groups=3), [r(1, 3, 5, 5), r(3, 1, 2, 2)])


@pytest.mark.parametrize("mode", ["max", "average", "average_count_exclude_padding"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(window=2),
        dict(window=3, stride=2),
        dict(window=3, stride=1, padding=1),
        dict(window=(2, 3), stride=(1, 2)),
    ],
)
def test_pooling(mode, kw):
    check_gradients(lambda x: opr.pooling(x, mode, **kw), [r(2, 2, 7, 7)])


def test_pooling_against_direct_loops():
    x = r(1, 2, 5, 5)
    from engine import ComputingGraph

    g = ComputingGraph()
    xv = opr.shared(g, x, "x")
    out = g.compile(opr.pooling(xv, "average_count_exclude_padding", window=3, stride=2, padding=1)).execute()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    for i in range(3):
        for j in range(3):
            np.testing.assert_allclose(
                out[..., i, j], np.nanmean(padded[..., 2 * i : 2 * i + 3, 2 * j : 2 * j + 3], axis=(-1, -2))
            )


def test_batch_norm_train_mode_gradient():
    def bn(x, w, b):
        g = x.graph
        rm = opr.shared(g, np.zeros(3), "rm", trainable=False)
        rv = opr.shared(g, np.ones(3), "rv", trainable=False)
        return opr.batch_norm(x, w, b, rm, rv)

    # The checker compiles without updates (eval mode) -- force training mode through the ModeSelect branch:
    def bn_train(x, w, b):
        return bn(x, w, b).inputs[0]

    check_gradients(bn_train, [r(4, 3, 2, 2), r(3, positive=True), r(3)])
    check_gradients(bn, [r(4, 3, 2, 2), r(3, positive=True), r(3)])

"""Losses: a scalar under every reduce mode, values equal to numpy references, errors at build time."""

from __future__ import annotations

import numpy as np
import pytest

from engine import BCEWithLogitsLoss, ComputingGraph, CrossEntropyLoss, L1Loss, MSELoss, ShapeError, grad, opr

N, C = 6, 5


def log_softmax(x, axis=1):
    x = x.astype(np.float64)
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def reduce(values, mode):
    return values.mean() if mode == "mean" else values.sum()


def run_loss(loss_fn, pred, label, wrt_pred=False):
    """Build pred/label as inputs, apply the loss, execute once; returns loss (and d loss / d pred)."""
    graph = ComputingGraph()
    p = opr.shared(graph, pred, "pred")  # shared, so grad can be taken with respect to it
    y = opr.host2device(graph, label.shape, label.dtype, name="label")
    loss = loss_fn(p, y)
    assert loss.shape == (), f"{type(loss_fn).__name__} returned shape {loss.shape}"
    outputs = [loss, grad(loss, p)] if wrt_pred else [loss]
    values = graph.compile(outputs, training=False).execute(label=label)
    return values if wrt_pred else values[0]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(N, C)).astype(np.float32)
    labels = rng.integers(0, C, size=N).astype(np.int64)
    target = rng.normal(size=(N, C)).astype(np.float32)
    binary = (rng.random(size=(N, C)) > 0.5).astype(np.float32)
    return logits, labels, target, binary


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_cross_entropy_with_logits(data, mode):
    logits, labels, _, _ = data
    nll = -log_softmax(logits)[np.arange(N), labels]
    value, dlogits = run_loss(CrossEntropyLoss(reduce_mode=mode), logits, labels, wrt_pred=True)
    np.testing.assert_allclose(value, reduce(nll, mode), rtol=1e-5)
    # d/dlogits = softmax - onehot (divided by N for the mean)
    expected = np.exp(log_softmax(logits)) - np.eye(C)[labels]
    np.testing.assert_allclose(dlogits, expected / (N if mode == "mean" else 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_cross_entropy_from_probabilities(data, mode):
    logits, labels, _, _ = data
    probs = np.exp(log_softmax(logits)).astype(np.float32)
    value = run_loss(CrossEntropyLoss(with_logits=False, reduce_mode=mode), probs, labels)
    np.testing.assert_allclose(value, reduce(-np.log(probs[np.arange(N), labels].astype(np.float64)), mode), rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "sum"])
@pytest.mark.parametrize("smooth", [0.1, 0.3])
def test_cross_entropy_label_smoothing(data, mode, smooth):
    logits, labels, _, _ = data
    logp = log_softmax(logits)
    # PyTorch's definition: the target is (1 - s) * onehot + s / C
    target = (1 - smooth) * np.eye(C)[labels] + smooth / C
    per_sample = -(target * logp).sum(axis=1)
    value = run_loss(CrossEntropyLoss(label_smooth=smooth, reduce_mode=mode), logits, labels)
    np.testing.assert_allclose(value, reduce(per_sample, mode), rtol=1e-5)
    plain = run_loss(CrossEntropyLoss(reduce_mode=mode), logits, labels)
    assert abs(value - plain) > 1e-3  # smoothing really changed something


def test_cross_entropy_along_another_axis():
    """axis=1 on (N, C, L) logits with (N, L) labels: per-position classification."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, C, 4)).astype(np.float32)
    labels = rng.integers(0, C, size=(3, 4)).astype(np.int64)
    logp = log_softmax(logits, axis=1)
    nll = -np.take_along_axis(logp, labels[:, None, :], axis=1)[:, 0, :]
    np.testing.assert_allclose(run_loss(CrossEntropyLoss(axis=1), logits, labels), nll.mean(), rtol=1e-5)


def test_cross_entropy_matches_torch(data):
    torch = pytest.importorskip("torch")
    logits, labels, _, _ = data
    for smooth in (0.0, 0.2):
        for mode in ("mean", "sum"):
            want = torch.nn.functional.cross_entropy(
                torch.tensor(logits), torch.tensor(labels), reduction=mode, label_smoothing=smooth
            )
            got = run_loss(CrossEntropyLoss(label_smooth=smooth, reduce_mode=mode), logits, labels)
            np.testing.assert_allclose(got, float(want), rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_mse(data, mode):
    logits, _, target, _ = data
    value, dpred = run_loss(MSELoss(mode), logits, target, wrt_pred=True)
    diff = logits.astype(np.float64) - target
    np.testing.assert_allclose(value, reduce(diff**2, mode), rtol=1e-5)
    np.testing.assert_allclose(dpred, 2 * diff / (diff.size if mode == "mean" else 1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_l1(data, mode):
    logits, _, target, _ = data
    value = run_loss(L1Loss(mode), logits, target)
    np.testing.assert_allclose(value, reduce(np.abs(logits.astype(np.float64) - target), mode), rtol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "sum"])
def test_bce_with_logits(data, mode):
    logits, _, _, binary = data
    x = logits.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    reference = -(binary * np.log(p) + (1 - binary) * np.log(1 - p))
    value, dx = run_loss(BCEWithLogitsLoss(mode), logits, binary, wrt_pred=True)
    np.testing.assert_allclose(value, reduce(reference, mode), rtol=1e-5)
    np.testing.assert_allclose(dx, (p - binary) / (x.size if mode == "mean" else 1), rtol=1e-4, atol=1e-6)


def test_bce_with_logits_is_stable_for_large_logits():
    x = np.array([[-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4]] * 2, np.float32)
    y = np.array([[0, 1, 0, 1, 1, 0, 1], [1, 0, 1, 0, 0, 1, 0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
        value, dx = run_loss(BCEWithLogitsLoss("sum"), x, y, wrt_pred=True)
    # Exact: a right-sided large logit costs ~0, a wrong-sided one costs ~|x|.
    wrong, size = (x > 0) != (y > 0.5), np.abs(x.astype(np.float64))
    want = np.where(wrong, size, 0.0) + np.log1p(np.exp(-size))
    np.testing.assert_allclose(value, want.sum(), rtol=1e-6)
    assert np.isfinite(dx).all()
    np.testing.assert_allclose(dx[:, [0, 6]], (np.array([[0, 1], [0, 1]]) - y[:, [0, 6]]), atol=1e-6)


def test_bce_matches_torch(data):
    torch = pytest.importorskip("torch")
    logits, _, _, binary = data
    x = np.concatenate([logits, np.array([[-200, 200, 50, -50, 0]], np.float32)])
    y = np.concatenate([binary, np.array([[1, 0, 1, 0, 1]], np.float32)])
    want = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y))
    np.testing.assert_allclose(run_loss(BCEWithLogitsLoss(), x, y), float(want), rtol=1e-5)


# ----- errors at build time -----


@pytest.mark.parametrize("loss_cls", [MSELoss, L1Loss, BCEWithLogitsLoss])
def test_shape_mismatch_raises_when_the_loss_is_built(loss_cls):
    graph = ComputingGraph()
    pred = opr.host2device(graph, (None, 3), name="pred")
    label = opr.host2device(graph, (None, 4), name="label")
    with pytest.raises(ShapeError, match=rf"{loss_cls.__name__}.*\(None, 3\).*\(None, 4\)"):
        loss_cls()(pred, label)


def test_cross_entropy_label_errors_at_build_time():
    graph = ComputingGraph()
    pred = opr.host2device(graph, (None, C), name="pred")
    float_labels = opr.host2device(graph, (None,), "float32", name="flabel")
    with pytest.raises(ShapeError, match="integer class indices"):
        CrossEntropyLoss()(pred, float_labels)
    wide_labels = opr.host2device(graph, (None, 2), "int64", name="wlabel")
    with pytest.raises(ShapeError, match="IndexingOneHot"):
        CrossEntropyLoss()(pred, wide_labels)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="reduce_mode"):
        MSELoss("median")
    with pytest.raises(ValueError, match="label_smooth"):
        CrossEntropyLoss(label_smooth=1.0)

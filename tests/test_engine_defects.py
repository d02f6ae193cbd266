"""Engine defects found by checking every operator against PyTorch (issue 16): each test failed
before its fix. Errors name the input and the shapes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine import ComputingGraph, CrossEntropyLoss, MSELoss, ShapeError, grad, nn, opr  # noqa: E402
from engine.trainer import Trainer  # noqa: E402


def _grads(build, *arrays):
    g = ComputingGraph()
    xs = [opr.shared(g, np.asarray(a, np.float64), f"in{i}") for i, a in enumerate(arrays)]
    loss = opr.sum(build(*xs))
    return g.compile(grad(loss, xs)).execute()


def _torch_grads(build, *arrays):
    ts = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    build(*ts).sum().backward()
    return [t.grad.numpy() for t in ts]


def test_cross_entropy_refuses_labels_out_of_range_naming_the_label():
    g = ComputingGraph()
    x = opr.host2device(g, (None, 3), name="x")
    label = opr.host2device(g, (None,), "int64", name="label")
    func = g.compile(CrossEntropyLoss()(x, label), training=False)
    logits = np.zeros((4, 3), np.float32)
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=r"'label' values must lie in \[0, 3\).*\(4, 3\).*got " + str(bad)):
            func.execute(x=logits, label=np.array([0, 1, bad, 2]))


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0, 2.5])
def test_pow_gradients_at_zero_base_match_pytorch(exponent):
    a = np.array([0.0, 0.5, 2.0])
    b = np.full(3, exponent)
    ours = _grads(lambda x, y: opr.pow(x, y), a, b)
    theirs = _torch_grads(lambda x, y: torch.pow(x, y), a, b)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o, t, rtol=1e-12, atol=0)
        assert np.all(np.isfinite(o))


def test_maximum_splits_a_tie_between_both_sides():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 1.0, 4.0])
    ours = _grads(opr.maximum, a, b)
    theirs = _torch_grads(torch.maximum, a, b)
    np.testing.assert_allclose(ours[0], theirs[0])
    np.testing.assert_allclose(ours[1], theirs[1])
    assert ours[0][0] == ours[1][0] == 0.5


def test_slice_of_a_fed_axis_declares_no_false_static_size():
    g = ComputingGraph()
    x = opr.host2device(g, (None, 4), name="x")
    head = opr.Slice.make(x, axis=0, start=0, stop=10)
    assert head.shape == (None, 4)
    out = g.compile(head, training=False).execute(x=np.ones((3, 4), np.float32))
    assert out.shape == (3, 4)


def test_batch_norm_training_with_one_value_per_channel_is_an_error_not_nan():
    layer = nn.BatchNorm2d(2)
    model = nn.Sequential(layer, nn.Flatten()).build((2, 1, 1))
    func = model.graph.compile(model.output, training=True)
    with pytest.raises(ValueError, match=r"more than one value per channel.*\(1, 2, 1, 1\)"):
        func.execute(x=np.ones((1, 2, 1, 1), np.float32))
    assert np.all(np.isfinite(layer.running_var.data))


def _classifier():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).build((4,))


def test_batch_size_mismatch_between_input_and_label_is_named():
    trainer = Trainer(_classifier(), batch_size=4)
    with pytest.raises(ValueError, match=r"'x' has shape \(4, 4\) and 'label' has shape \(3,\)"):
        trainer.step(np.ones((4, 4), np.float32), np.array([0, 1, 2]))
    # the compiled function itself (no Trainer in between) names them too
    with pytest.raises(ValueError, match=r"'label' has shape \(3,\) but the values it indexes have shape \(4, 3\)"):
        trainer.train_fn.execute(x=np.ones((4, 4), np.float32), label=np.array([0, 1, 2]))


def test_empty_batch_is_a_clear_error():
    trainer = Trainer(_classifier(), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        trainer.step(np.ones((0, 4), np.float32), np.zeros(0, np.int64))


def test_mse_refuses_to_broadcast_a_batch_of_one_label():
    g = ComputingGraph()
    pred = opr.host2device(g, (None, 2), name="pred")
    label = opr.host2device(g, (None, 2), name="target")
    func = g.compile(MSELoss()(pred, label), training=False)
    with pytest.raises(ValueError, match=r"'target' has shape \(1, 2\) but 'pred' has shape \(5, 2\)"):
        func.execute(pred=np.zeros((5, 2), np.float32), target=np.zeros((1, 2), np.float32))
    with pytest.raises(ShapeError, match="must have the same shape"):
        MSELoss()(pred, opr.host2device(g, (None, 3), name="wide"))

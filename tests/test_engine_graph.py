"""The graph's contract: build-time shape errors, compile/execute, shared parameters, update
ordering, feed checking, and train/eval behaviour of dropout and batch normalization."""

from __future__ import annotations

import numpy as np
import pytest

from engine import SGD, ComputingGraph, CrossEntropyLoss, GraphError, ShapeError, grad, opr

# ----- shape errors at build time name the operator and both shapes -----


def test_convolution_channel_mismatch():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 3, 8, 8), name="x")
    w = opr.shared(graph, np.zeros((4, 2, 3, 3), np.float32), "w")
    with pytest.raises(ShapeError, match=r"Convolution.*\(\?, 3, 8, 8\).*\(4, 2, 3, 3\)"):
        opr.convolution(x, w)


def test_convolution_groups_must_divide_channels():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 6, 8, 8), name="x")
    w = opr.shared(graph, np.zeros((4, 2, 3, 3), np.float32), "w")
    with pytest.raises(ShapeError, match="Convolution.*groups"):
        opr.convolution(x, w, groups=4)


def test_matmul_inner_size_mismatch():
    graph = ComputingGraph()
    a = opr.host2device(graph, (None, 5), name="a")
    b = opr.shared(graph, np.zeros((4, 2), np.float32), "b")
    with pytest.raises(ShapeError, match=r"MatrixMul.*\(\?, 5\).*\(4, 2\)"):
        opr.matrix_mul(a, b)


def test_broadcast_failure():
    graph = ComputingGraph()
    a = opr.host2device(graph, (None, 3), name="a")
    b = opr.shared(graph, np.zeros((2, 4), np.float32), "b")
    with pytest.raises(ShapeError, match=r"Mul.*\(None, 3\).*\(2, 4\)"):
        a * b


def test_reshape_size_mismatch():
    graph = ComputingGraph()
    x = opr.shared(graph, np.zeros((2, 3), np.float32), "x")
    with pytest.raises(ShapeError, match=r"Reshape.*\(2, 3\).*6.*\(4, 2\).*8"):
        opr.reshape(x, (4, 2))
    with pytest.raises(ShapeError, match=r"Reshape.*\(2, 3\).*\(-1, 4\)"):
        opr.reshape(x, (-1, 4))


def test_pooling_window_too_large():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 1, 4, 4), name="x")
    with pytest.raises(ShapeError, match=r"Pooling.*\(\?, 1, 4, 4\)"):
        opr.pooling(x, "max", window=5)


def test_shapes_are_inferred_as_nodes_are_added():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 1, 28, 28), name="x")
    w = opr.shared(graph, np.zeros((6, 1, 5, 5), np.float32), "w")
    h = opr.convolution(x, w, padding=2)
    assert h.shape == (None, 6, 28, 28)
    p = opr.pooling(h, "max", window=2)
    assert p.shape == (None, 6, 14, 14)
    assert p.flatten().shape == (None, 6 * 14 * 14)
    assert opr.sum(p, axis=(2, 3)).shape == (None, 6)


# ----- grad -----


def test_grad_of_non_scalar_is_a_clear_error():
    graph = ComputingGraph()
    w = opr.shared(graph, np.ones((3,), np.float32), "w")
    with pytest.raises(GraphError, match=r"scalar.*\(3,\)"):
        grad(w * 2.0, w)


def test_grad_of_unrelated_weight_is_zero():
    graph = ComputingGraph()
    a = opr.shared(graph, np.ones((3,), np.float32), "a")
    b = opr.shared(graph, np.ones((2,), np.float32), "b")
    ga, gb = grad(opr.sum(a * a), [a, b])
    out = graph.compile([ga, gb]).execute()
    np.testing.assert_array_equal(out[0], [2, 2, 2])
    np.testing.assert_array_equal(out[1], [0, 0])


def test_mixing_graphs_is_an_error():
    g1, g2 = ComputingGraph(), ComputingGraph()
    a = opr.shared(g1, np.ones(2, np.float32), "a")
    b = opr.shared(g2, np.ones(2, np.float32), "b")
    with pytest.raises(GraphError, match="different graphs"):
        a + b
    with pytest.raises(GraphError, match="not a SymbolVar of this graph"):
        g2.compile([a])


# ----- one graph, two functions, one set of parameters -----


def classifier(seed=0):
    rng = np.random.default_rng(seed)
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 4), name="x")
    y = opr.host2device(graph, (None,), "int64", name="label")
    w = opr.shared(graph, rng.normal(size=(4, 3)).astype(np.float32), "w")
    b = opr.shared(graph, np.zeros(3, np.float32), "b")
    logits = opr.matrix_mul(x, w) + b
    loss = CrossEntropyLoss()(logits, y)
    data = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 3, size=8).astype(np.int64)
    return graph, x, y, w, b, logits, loss, data


def test_train_and_eval_functions_share_parameters():
    graph, x, y, w, b, logits, loss, (xs, ys) = classifier()
    updates = SGD(0.5).make_multiple([w, b], grad(loss, [w, b]), graph)
    train = graph.compile([loss], updates=updates)
    evaluate = graph.compile([logits])
    before = evaluate.execute(x=xs)[0]
    np.testing.assert_array_equal(evaluate.execute(x=xs)[0], before)  # evaluation writes nothing
    w_before = w.value.copy()
    losses = [float(train.execute(x=xs, label=ys)[0]) for _ in range(5)]
    assert losses[-1] < losses[0]
    after = evaluate.execute(x=xs)[0]
    np.testing.assert_allclose(after, xs @ w.value + b.value, rtol=1e-5, atol=1e-6)
    assert not np.allclose(w.value, w_before)
    assert not np.allclose(after, before)


def test_updates_happen_after_every_reader_of_the_old_value():
    graph, x, y, w, b, logits, loss, (xs, ys) = classifier()
    w0, b0 = w.value.copy(), b.value.copy()
    updates = SGD(0.5).make_multiple([w, b], grad(loss, [w, b]), graph)
    # Outputs read w in the same step that rewrites it: they must see the value from before the step.
    train = graph.compile([logits, w * 1.0, w], updates=updates)
    got_logits, got_w_times_one, got_w = train.execute(x=xs, label=ys)
    np.testing.assert_allclose(got_logits, xs @ w0 + b0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_w_times_one, w0)
    np.testing.assert_array_equal(got_w, w0)
    assert not np.allclose(w.value, w0)  # ...and the step did happen
    got_w_next = train.execute(x=xs, label=ys)[2]
    assert not np.allclose(got_w_next, w0)


def test_an_update_that_copies_a_weight_sees_the_old_weight():
    graph = ComputingGraph()
    w = opr.shared(graph, np.array([1.0, 2.0], np.float32), "w")
    anchor = opr.shared(graph, np.zeros(2, np.float32), "anchor")
    func = graph.compile([], updates=[opr.add_update(w, 1.0), opr.add_update(anchor, w, alpha=0.0)])
    func.execute()
    np.testing.assert_array_equal(w.value, [2.0, 3.0])
    np.testing.assert_array_equal(anchor.value, [1.0, 2.0])  # the old w


def test_two_updates_of_one_tensor_are_rejected():
    graph = ComputingGraph()
    w = opr.shared(graph, np.zeros(2, np.float32), "w")
    with pytest.raises(GraphError, match="same shared tensor"):
        graph.compile([], updates=[opr.add_update(w, 1.0), opr.add_update(w, 2.0)])


# ----- feeding -----


def test_feeding_wrong_shape_dtype_or_names_is_a_clear_error():
    graph, x, y, w, b, logits, loss, (xs, ys) = classifier()
    func = graph.compile([loss])
    assert float(func.execute(x=xs, label=ys)[0]) > 0
    with pytest.raises(GraphError, match=r"'x'.*expected shape.*4\).*got \(8, 5\)"):
        func.execute(x=np.zeros((8, 5), np.float32), label=ys)
    with pytest.raises(GraphError, match=r"'x'.*expected shape.*4\).*got \(4,\)"):
        func.execute(x=np.zeros(4, np.float32), label=ys)
    with pytest.raises(GraphError, match="'label'.*int64.*float32"):
        func.execute(x=xs, label=ys.astype(np.float32))
    with pytest.raises(GraphError, match="missing inputs \\['label'\\]"):
        func.execute(x=xs)
    with pytest.raises(GraphError, match="unknown inputs \\['z'\\]"):
        func.execute(x=xs, label=ys, z=1)


def test_batch_size_is_free_at_execute():
    graph, x, y, w, b, logits, loss, (xs, ys) = classifier()
    func = graph.compile([logits])
    assert func.execute(x=xs[:3])[0].shape == (3, 3)
    assert func.execute(x=xs)[0].shape == (8, 3)


# ----- dropout -----


def test_dropout_train_and_eval():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 100), name="x")
    y = opr.dropout(x, p=0.3, seed=1)
    train, evaluate = graph.compile([y], training=True), graph.compile([y], training=False)
    ones = np.ones((100, 100), np.float32)
    first, second = train.execute(x=ones)[0], train.execute(x=ones)[0]
    assert set(np.unique(first)) <= {0.0, np.float32(1 / 0.7)}
    assert 0.25 < (first == 0).mean() < 0.35
    assert not np.array_equal(first, second)  # a fresh mask each step
    np.testing.assert_array_equal(evaluate.execute(x=ones)[0], ones)


def test_dropout_gradient_follows_the_mask():
    graph = ComputingGraph()
    w = opr.shared(graph, np.ones((50, 50), np.float32), "w")
    y = opr.dropout(w, p=0.5, seed=2)
    out, dw = graph.compile([y, grad(opr.sum(y), w)], training=True).execute()
    np.testing.assert_array_equal(dw, out)  # w = 1, so y == mask == dy/dw
    eval_grad = graph.compile([grad(opr.sum(y), w)], training=False).execute()[0]
    np.testing.assert_array_equal(eval_grad, np.ones((50, 50)))


# ----- batch normalization -----


def batch_norm_graph(channels=3, seed=0):
    rng = np.random.default_rng(seed)
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, channels, 4, 5), name="x")
    gamma = opr.shared(graph, rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn.weight")
    beta = opr.shared(graph, rng.normal(size=channels).astype(np.float32), "bn.bias")
    mean = opr.shared(graph, np.zeros(channels, np.float32), "bn.running_mean", trainable=False)
    var = opr.shared(graph, np.ones(channels, np.float32), "bn.running_var", trainable=False)
    y = opr.batch_norm(x, gamma, beta, mean, var, momentum=0.1, eps=1e-5)
    batches = [rng.normal(loc=2.0, scale=3.0, size=(6, channels, 4, 5)).astype(np.float32) for _ in range(3)]
    return graph, x, y, (gamma, beta, mean, var), batches


def test_batch_norm_running_stats_move_only_in_training():
    graph, x, y, (gamma, beta, mean, var), batches = batch_norm_graph()
    evaluate = graph.compile([y], training=False)
    out = evaluate.execute(x=batches[0])[0]
    np.testing.assert_array_equal(mean.value, 0)
    np.testing.assert_array_equal(var.value, 1)
    # Eval with the initial statistics (0, 1) is just an affine map.
    expect = batches[0] / np.sqrt(1 + 1e-5) * gamma.value[:, None, None] + beta.value[:, None, None]
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)

    train = graph.compile([y], training=True)
    out = train.execute(x=batches[0])[0]
    # Training output is normalized per channel by the batch statistics.
    normalized = (out - beta.value[:, None, None]) / gamma.value[:, None, None]
    np.testing.assert_allclose(normalized.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(normalized.std(axis=(0, 2, 3)), 1, atol=1e-3)
    b = batches[0].astype(np.float64)
    np.testing.assert_allclose(mean.value, 0.1 * b.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(var.value, 0.9 + 0.1 * b.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    frozen = mean.value.copy(), var.value.copy()
    evaluate.execute(x=batches[1])
    np.testing.assert_array_equal(mean.value, frozen[0])
    np.testing.assert_array_equal(var.value, frozen[1])


def test_batch_norm_matches_torch_batchnorm2d():
    torch = pytest.importorskip("torch")
    graph, x, y, (gamma, beta, mean, var), batches = batch_norm_graph(seed=3)
    r = np.random.default_rng(4).normal(size=batches[0].shape).astype(np.float32)
    weight_grads = grad(opr.sum(y * r), [x, gamma, beta])
    train = graph.compile([y, *weight_grads], training=True)
    evaluate = graph.compile([y], training=False)

    bn = torch.nn.BatchNorm2d(3, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma.value))
        bn.bias.copy_(torch.tensor(beta.value))
    bn.train()
    for batch in batches:
        out, dx, dgamma, dbeta = train.execute(x=batch)
        tx = torch.tensor(batch, requires_grad=True)
        ty = bn(tx)
        (ty * torch.tensor(r)).sum().backward()
        np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(dgamma, bn.weight.grad.numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(dbeta, bn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)
        bn.weight.grad, bn.bias.grad = None, None
        np.testing.assert_allclose(mean.value, bn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var.value, bn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    bn.eval()
    test_batch = batches[0] * 0.5 + 1.0
    want = bn(torch.tensor(test_batch)).detach().numpy()
    np.testing.assert_allclose(evaluate.execute(x=test_batch)[0], want, rtol=1e-4, atol=1e-4)


def test_reshape_of_a_fed_size_that_can_never_fit_fails_at_build_time():
    graph = ComputingGraph()
    x = opr.host2device(graph, (None, 3, 8, 8), name="x")
    with pytest.raises(ShapeError, match=r"Reshape: .*multiple of 192"):
        opr.reshape(x, (5, 7))
    assert opr.reshape(x, (2, 192)).shape == (2, 192)  # a batch of 2 fits: allowed

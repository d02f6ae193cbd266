"""SGD and Adam against reference update rules, step by step.

The numpy references below are written from PyTorch's documented algorithms
(https://pytorch.org/docs/stable/generated/torch.optim.SGD.html and .../torch.optim.Adam.html),
not from engine code. Gradients are fed as graph inputs, so these tests check the optimizer
alone; a final test drives both the engine and torch.optim through a real loss.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine import SGD, Adam, ComputingGraph, GraphError, MSELoss, grad, opr

STEPS = 6
SHAPE = (3, 4)


# ----- references (float64) -----


def sgd_reference(w, grads, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """torch.optim.SGD with dampening 0: returns the weight after each step."""
    w, buf, out = w.astype(np.float64), None, []
    for g in grads:
        g = g.astype(np.float64)
        if weight_decay:
            g = g + weight_decay * w
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
        out.append(w)
    return out


def adam_reference(w, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
    """torch.optim.Adam (L2 weight decay, optional AMSGrad): the weight after each step."""
    b1, b2 = betas
    w = w.astype(np.float64)
    m, v, v_max, out = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w), []
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        if weight_decay:
            g = g + weight_decay * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        if amsgrad:
            v_max = np.maximum(v_max, v)
            denom = np.sqrt(v_max) / np.sqrt(bc2) + eps
        else:
            denom = np.sqrt(v) / np.sqrt(bc2) + eps
        w = w - (lr / bc1) * m / denom
        out.append(w)
    return out


# ----- engine side -----


def problem(seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=SHAPE).astype(np.float32)
    # Gradients of varying sign and size, including a step with much smaller values (exercises AMSGrad's max).
    grads = [rng.normal(scale=s, size=SHAPE).astype(np.float32) for s in (1.0, 0.5, 2.0, 0.1, 1.5, 0.05)]
    return w0, grads[:STEPS]


def engine_steps(optimizer, w0, grads):
    """Run the optimizer's update with `grads` fed as an input; the weight after each step."""
    graph = ComputingGraph()
    w = opr.shared(graph, w0, "w")
    g = opr.host2device(graph, SHAPE, "float32", name="g")
    func = graph.compile([], updates=optimizer.make_multiple([w], [g], graph))
    out = []
    for gi in grads:
        func.execute(g=gi)
        out.append(w.value.copy())
    return out


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "weight_decay": dict(lr=0.05, weight_decay=0.01),
    "momentum_weight_decay": dict(lr=0.05, momentum=0.8, weight_decay=0.1),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "nesterov_weight_decay": dict(lr=0.03, momentum=0.5, nesterov=True, weight_decay=0.2),
}

ADAM_CASES = {
    "default": dict(lr=0.01),
    "weight_decay": dict(lr=0.01, weight_decay=0.1),
    "amsgrad": dict(lr=0.02, amsgrad=True),
    "amsgrad_weight_decay_betas": dict(lr=0.05, amsgrad=True, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6),
}


@pytest.mark.parametrize("case", SGD_CASES)
def test_sgd_matches_reference(case):
    w0, grads = problem()
    got = engine_steps(SGD(**SGD_CASES[case]), w0, grads)
    want = sgd_reference(w0, grads, **SGD_CASES[case])
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"SGD {case}, step {step}")


@pytest.mark.parametrize("case", ADAM_CASES)
def test_adam_matches_reference(case):
    w0, grads = problem(1)
    got = engine_steps(Adam(**ADAM_CASES[case]), w0, grads)
    want = adam_reference(w0, grads, **ADAM_CASES[case])
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"Adam {case}, step {step}")


def test_references_are_not_trivially_equal():
    """Guard the guards: the variants really differ, so each parametrized case tests something."""
    w0, grads = problem()
    finals = {case: sgd_reference(w0, grads, **kw)[-1] for case, kw in SGD_CASES.items()}
    finals.update({f"adam_{c}": adam_reference(w0, grads, **kw)[-1] for c, kw in ADAM_CASES.items()})
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.allclose(finals[a], finals[b], rtol=1e-4), (a, b)


def test_amsgrad_state_keeps_running_maximum():
    w0, grads = problem(1)
    graph = ComputingGraph()
    w = opr.shared(graph, w0, "w")
    g = opr.host2device(graph, SHAPE, "float32", name="g")
    opt = Adam(lr=0.01, amsgrad=True)
    func = graph.compile([], updates=opt.make_multiple([w], [g], graph))
    v = np.zeros(SHAPE)
    v_max = np.zeros(SHAPE)
    for gi in grads:
        func.execute(g=gi)
        v = 0.999 * v + 0.001 * gi.astype(np.float64) ** 2
        v_max = np.maximum(v_max, v)
    np.testing.assert_allclose(opt.state["w.max_exp_avg_sq"].value, v_max, rtol=1e-5)
    assert (opt.state["w.max_exp_avg_sq"].value > opt.state["w.exp_avg_sq"].value).any()


# ----- the interface -----


def test_make_multiple_length_mismatch_is_a_clear_error():
    graph = ComputingGraph()
    a = opr.shared(graph, np.ones(2, np.float32), "a")
    b = opr.shared(graph, np.ones(2, np.float32), "b")
    g = opr.host2device(graph, (2,), name="g")
    with pytest.raises(GraphError, match="2 weights but 1 gradients"):
        SGD(0.1).make_multiple([a, b], [g], graph)


def test_gradient_shape_mismatch_names_the_weight():
    graph = ComputingGraph()
    a = opr.shared(graph, np.ones((2, 3), np.float32), "a")
    g = opr.host2device(graph, (3, 2), name="g")
    with pytest.raises(GraphError, match=r"\(3, 2\).*a.*\(2, 3\)"):
        Adam(0.1).make(a, g, graph)


def test_only_shared_tensors_can_be_updated():
    graph = ComputingGraph()
    x = opr.host2device(graph, (2,), name="x")
    with pytest.raises(GraphError, match="not a shared tensor"):
        SGD(0.1).make(x, x * 2.0, graph)


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="learning rate"):
        SGD(0.0)
    with pytest.raises(ValueError, match="nesterov"):
        SGD(0.1, nesterov=True)


@pytest.mark.parametrize("make_opt", [lambda: SGD(0.1, momentum=0.9), lambda: Adam(0.1)])
def test_set_lr_takes_effect_without_recompiling(make_opt):
    w0, grads = problem(2)
    opt = make_opt()
    graph = ComputingGraph()
    w = opr.shared(graph, w0, "w")
    g = opr.host2device(graph, SHAPE, "float32", name="g")
    func = graph.compile([], updates=opt.make_multiple([w], [g], graph))
    func.execute(g=grads[0])
    after_one = w.value.copy()
    opt.set_lr(0.0)  # frozen: the same compiled function must now leave w alone...
    func.execute(g=grads[1])
    np.testing.assert_array_equal(w.value, after_one)
    opt.set_lr(0.1)  # ...and move it again afterwards
    func.execute(g=grads[2])
    assert not np.allclose(w.value, after_one)


def test_two_weights_keep_separate_state():
    rng = np.random.default_rng(3)
    graph = ComputingGraph()
    a0, b0 = rng.normal(size=(2, 2)).astype(np.float32), rng.normal(size=(5,)).astype(np.float32)
    a, b = opr.shared(graph, a0, "a"), opr.shared(graph, b0, "b")
    ga, gb = opr.host2device(graph, (2, 2), name="ga"), opr.host2device(graph, (5,), name="gb")
    opt = Adam(0.01, amsgrad=True)
    func = graph.compile([], updates=opt.make_multiple([a, b], [ga, gb], graph))
    grads_a = [rng.normal(size=(2, 2)).astype(np.float32) for _ in range(4)]
    grads_b = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    for x, y in zip(grads_a, grads_b, strict=True):
        func.execute(ga=x, gb=y)
    for var, start, grads in ((a, a0, grads_a), (b, b0, grads_b)):
        want = adam_reference(start, grads, 0.01, amsgrad=True)[-1]
        np.testing.assert_allclose(var.value, want, rtol=1e-5, atol=1e-6, err_msg=var.name)


# ----- against torch.optim directly (skipped when torch is absent) -----


def _torch_steps(torch, opt_cls, kwargs, w0, grads):
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = opt_cls([p], **kwargs)
    out = []
    for gi in grads:
        p.grad = torch.tensor(gi, dtype=torch.float64)
        opt.step()
        out.append(p.detach().numpy().copy())
    return out


@pytest.mark.parametrize("kind,case", [("sgd", c) for c in SGD_CASES] + [("adam", c) for c in ADAM_CASES])
def test_against_torch_optim(kind, case):
    torch = pytest.importorskip("torch")
    kwargs = (SGD_CASES if kind == "sgd" else ADAM_CASES)[case]
    w0, grads = problem(4)
    engine_opt = SGD(**kwargs) if kind == "sgd" else Adam(**kwargs)
    torch_cls = torch.optim.SGD if kind == "sgd" else torch.optim.Adam
    got = engine_steps(engine_opt, w0, grads)
    want = _torch_steps(torch, torch_cls, kwargs, w0, grads)
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{kind} {case}, step {step}")


def test_training_a_regression_matches_torch():
    """Loss -> grad -> Adam in the engine, and the same in torch, give the same weights."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.normal(size=(16, 2)).astype(np.float32)
    w0 = rng.normal(size=(4, 2)).astype(np.float32)

    graph = ComputingGraph()
    w = opr.shared(graph, w0, "w")
    xv = opr.host2device(graph, (None, 4), name="x")
    yv = opr.host2device(graph, (None, 2), name="y")
    loss = MSELoss()(opr.matrix_mul(xv, w), yv)
    opt = Adam(0.05, weight_decay=0.01, amsgrad=True)
    func = graph.compile([loss], updates=opt.make_multiple([w], grad(loss, [w]), graph))
    engine_losses = [float(func.execute(x=x, y=y)[0]) for _ in range(5)]

    tw = torch.nn.Parameter(torch.tensor(w0))
    topt = torch.optim.Adam([tw], lr=0.05, weight_decay=0.01, amsgrad=True)
    torch_losses = []
    for _ in range(5):
        topt.zero_grad()
        tl = torch.nn.functional.mse_loss(torch.tensor(x) @ tw, torch.tensor(y))
        tl.backward()
        topt.step()
        torch_losses.append(float(tl.detach()))
    np.testing.assert_allclose(engine_losses, torch_losses, rtol=1e-5)
    np.testing.assert_allclose(w.value, tw.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_two_optimizers_in_one_graph_keep_their_own_learning_rates():
    graph = ComputingGraph()
    a, b = opr.shared(graph, np.zeros(1, np.float32), "a"), opr.shared(graph, np.zeros(1, np.float32), "b")
    ga, gb = opr.host2device(graph, (1,), name="ga"), opr.host2device(graph, (1,), name="gb")
    fast, slow = SGD(1.0), SGD(0.1)
    updates = fast.make_multiple([a], [ga], graph) + slow.make_multiple([b], [gb], graph)
    func = graph.compile([], updates=updates)
    one = np.ones(1, np.float32)
    func.execute(ga=one, gb=one)
    np.testing.assert_allclose([a.value[0], b.value[0]], [-1.0, -0.1], rtol=1e-6)
    slow.set_lr(0.5)  # changes only its own weight's steps
    func.execute(ga=one, gb=one)
    np.testing.assert_allclose([a.value[0], b.value[0]], [-2.0, -0.6], rtol=1e-6)

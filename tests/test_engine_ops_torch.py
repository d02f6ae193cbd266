"""The operators of today's small models against PyTorch in float64: forward values and the
gradients of sum(out * R) for a random R, for every input."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from engine import ComputingGraph, ShapeError, grad, opr  # noqa: E402

rng = np.random.default_rng(16)


def r(*shape):
    return rng.standard_normal(shape)


def compare(ours, theirs, arrays, rtol=1e-10, atol=1e-12):
    """ours(*SymbolVars) and theirs(*tensors) on the same float64 arrays: values and gradients."""
    g = ComputingGraph()
    xs = [opr.shared(g, np.asarray(a, np.float64), f"in{i}") for i, a in enumerate(arrays)]
    out = ours(*xs)
    weights = rng.standard_normal([int(d) for d in out.shape])
    loss = opr.sum(out * g.constant(weights))
    value, *grads = g.compile([out, *grad(loss, xs)]).execute()
    ts = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays]
    expected = theirs(*ts)
    (expected * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(value, expected.detach().numpy(), rtol=rtol, atol=atol, err_msg="forward")
    for i, (o, t) in enumerate(zip(grads, ts)):
        np.testing.assert_allclose(o, t.grad.numpy(), rtol=rtol, atol=atol, err_msg=f"gradient of input {i}")


@pytest.mark.parametrize(
    "ours,theirs,rtol",
    [
        (opr.erf, torch.erf, 1e-10),
        (opr.gelu, F.gelu, 1e-10),
        (opr.silu, F.silu, 1e-10),
        (opr.relu6, F.relu6, 1e-10),
        (lambda x: opr.clip(x, -0.5, None), lambda x: torch.clamp(x, min=-0.5), 1e-10),
        # PyTorch's hardsigmoid backward multiplies by 1.0f/6.0f, a float32 constant, even in float64
        (opr.hard_sigmoid, F.hardsigmoid, 1e-7),
        (opr.hard_swish, F.hardswish, 1e-10),
    ],
)
def test_activations(ours, theirs, rtol):
    x = np.concatenate([r(40) * 4, [0.0, 3.0, -3.0, 6.0, 0.5, 1.0, 9.0, -9.0]])
    compare(ours, theirs, [x], rtol=rtol)


def test_erf_is_exact_to_rounding_over_its_range():
    x = np.linspace(-10, 10, 20001)
    g = ComputingGraph()
    out = g.compile(opr.erf(g.constant(x)), training=False).execute()
    np.testing.assert_allclose(out, torch.erf(torch.tensor(x)).numpy(), rtol=4e-16, atol=4e-16)


def test_where_and_comparisons():
    a, b = r(3, 4), r(4)
    compare(lambda x, y: opr.where(opr.less(x, y), x, y), lambda x, y: torch.where(x < y, x, y), [a, b])
    compare(lambda x, y: opr.where(opr.greater(x, 0.0), x * y, y), lambda x, y: torch.where(x > 0, x * y, y), [a, b])


def test_broadcast_to_with_a_run_time_batch():
    g = ComputingGraph()
    x = opr.host2device(g, (None, 3), name="x")
    token = opr.shared(g, np.arange(4.0).reshape(1, 1, 4), "token")
    wide = opr.broadcast_to(token, [None, 3, 4], ref=x, ref_axes=[0, None, None])
    assert wide.shape == (None, 3, 4)
    loss = opr.sum(wide)
    value, d_token = g.compile([wide, grad(loss, token)]).execute(x=np.zeros((5, 3), np.float32))
    assert value.shape == (5, 3, 4)
    np.testing.assert_array_equal(d_token, np.full((1, 1, 4), 15.0))
    compare(lambda t: opr.broadcast_to(t, [2, 3, 4]), lambda t: t.expand(2, 3, 4), [r(3, 1)])


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_batched_matmul_broadcasts_leading_axes(ta, tb):
    a = r(2, 3, 5, 4) if ta else r(2, 3, 4, 5)
    b = r(3, 6, 5) if tb else r(3, 5, 6)

    def theirs(x, y):
        return torch.matmul(x.transpose(-1, -2) if ta else x, y.transpose(-1, -2) if tb else y)

    compare(lambda x, y: opr.matmul(x, y, ta, tb), theirs, [a, b])


def test_softmax_over_any_axis_inside_attention():
    q, k, v = r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 4)

    def ours(q, k, v):
        return opr.matmul(opr.softmax(opr.matmul(q, k, transpose_b=True) * 0.5, axis=-1), v)

    compare(ours, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.5), [q, k, v])
    compare(lambda x: opr.softmax(x, axis=1), lambda x: torch.softmax(x, 1), [r(2, 3, 4)])


@pytest.mark.parametrize("axis", [-1, -2])
def test_layer_norm(axis):
    shape = (3, 4, 5)
    normalized = shape[axis:]
    x, w, b = r(*shape) * 3 + 1, r(*normalized), r(*normalized)
    compare(
        lambda x, w, b: opr.layer_norm(x, w, b, axis=axis, eps=1e-5),
        lambda x, w, b: F.layer_norm(x, normalized, w, b, eps=1e-5),
        [x, w, b],
    )


def test_split():
    x = r(4, 7)
    compare(lambda x: opr.concat(opr.split(x, [2, 3, 2], axis=1)[::-1], axis=1),
            lambda x: torch.cat(torch.split(x, [2, 3, 2], 1)[::-1], 1), [x])  # fmt: skip
    with pytest.raises(ShapeError, match="do not add up"):
        opr.split(ComputingGraph().constant(x), [2, 2], axis=1)


@pytest.mark.parametrize("stride,padding,dilation,multiplier", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 1), (2, 0, 1, 2)])
def test_depthwise_convolution(stride, padding, dilation, multiplier):
    x, w = r(2, 3, 9, 8), r(3 * multiplier, 1, 3, 3)
    ours = opr.convolution  # groups == input channels dispatches to the depthwise operator
    compare(
        lambda x, w: ours(x, w, stride, padding, dilation, groups=3),
        lambda x, w: F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=3),
        [x, w],
    )
    g = ComputingGraph()
    assert isinstance(opr.convolution(g.constant(x), g.constant(w), groups=3).op, opr.DepthwiseConvolution)


def test_conv1d_and_global_average_pooling():
    compare(
        lambda x, w: opr.conv1d(x, w, stride=2, padding=1),
        lambda x, w: F.conv1d(x, w, stride=2, padding=1),
        [r(2, 3, 11), r(4, 3, 3)],
    )
    compare(opr.global_avg_pool, lambda x: F.adaptive_avg_pool2d(x, 1), [r(2, 3, 5, 4)])


@pytest.mark.parametrize("size", [(8, 6), (5, 7), (2, 2)])
def test_resize_nearest_as_pytorch_upsample(size):
    compare(
        lambda x: opr.resize_nearest(x, size), lambda x: F.interpolate(x, size=size, mode="nearest"), [r(2, 3, 4, 3)]
    )

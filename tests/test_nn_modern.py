"""engine.nn's transformer, recurrent and mobile layers against PyTorch's with the same weights:
outputs and the gradients of every parameter and of the input (float32; the operators under
them are checked in float64 in test_engine_ops_torch.py)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine import ComputingGraph, grad, nn, opr  # noqa: E402

rng = np.random.default_rng(7)


def check_module(ours, theirs, x, pick=lambda out: out, tol=2e-5):
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    g = ComputingGraph()
    params = ours.attach(g)
    xv = opr.shared(g, x, "x")
    out = pick(ours(xv))
    weights = rng.standard_normal(out.shape).astype(np.float32)
    loss = opr.sum(out * g.constant(weights))
    names = list(params)
    value, dx, *dparams = g.compile([out, *grad(loss, [xv, *params.values()])]).execute()
    xt = torch.tensor(x, requires_grad=True)
    expected = pick(theirs(xt))
    (expected * torch.tensor(weights)).sum().backward()
    np.testing.assert_allclose(value, expected.detach().numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=tol, atol=tol, err_msg="input gradient")
    torch_params = dict(theirs.named_parameters())
    for name, d in zip(names, dparams):
        np.testing.assert_allclose(d, torch_params[name].grad.numpy(), rtol=tol, atol=tol, err_msg=name)


def x_(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_layer_norm():
    theirs = torch.nn.LayerNorm(6)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    check_module(nn.LayerNorm(6), theirs, x_(3, 4, 6))


def test_multihead_self_attention():
    torch.manual_seed(0)
    check_module(
        nn.MultiheadAttention(8, 2), _SelfAttention(torch.nn.MultiheadAttention(8, 2, batch_first=True)), x_(3, 5, 8)
    )


class _SelfAttention(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]

    def state_dict(self, *args, **kwargs):
        return self.attn.state_dict()

    def named_parameters(self, *args, **kwargs):
        return self.attn.named_parameters()


@pytest.mark.parametrize("batch_first", [True, False])
def test_gru_two_layers(batch_first):
    torch.manual_seed(1)
    theirs = torch.nn.GRU(5, 7, num_layers=2, batch_first=batch_first)
    x = x_(3, 6, 5) if batch_first else x_(6, 3, 5)
    ours = nn.GRU(5, 7, num_layers=2, batch_first=batch_first)
    pick = lambda out: out[0] + out[1].sum() if torch.is_tensor(out[0]) else out[0] + opr.sum(out[1])  # noqa: E731
    check_module(ours, theirs, x, pick=pick)


def test_lstm():
    torch.manual_seed(2)
    theirs = torch.nn.LSTM(4, 6, batch_first=True)
    pick = lambda out: out[0] + out[1][1].sum() if torch.is_tensor(out[0]) else out[0] + opr.sum(out[1][1])  # noqa: E731
    check_module(nn.LSTM(4, 6, batch_first=True), theirs, x_(2, 5, 4), pick=pick)


def test_mobile_layers():
    torch.manual_seed(3)
    check_module(nn.Conv1d(3, 4, 3, padding=1), torch.nn.Conv1d(3, 4, 3, padding=1), x_(2, 3, 9))
    pairs = [
        (nn.GELU(), torch.nn.GELU()),
        (nn.SiLU(), torch.nn.SiLU()),
        (nn.ReLU6(), torch.nn.ReLU6()),
        (nn.Hardswish(), torch.nn.Hardswish()),
        (nn.AdaptiveAvgPool2d(1), torch.nn.AdaptiveAvgPool2d(1)),
    ]
    for ours, theirs in pairs:
        check_module(ours, theirs, x_(2, 3, 4, 4) * 4)
    depthwise = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
    check_module(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), depthwise, x_(2, 4, 7, 7))

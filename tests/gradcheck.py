"""Central finite differences against the engine's symbolic gradients, in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from engine import ComputingGraph, grad, opr


def check_gradients(
    build: Callable[..., object],
    arrays: Sequence[np.ndarray],
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    seed: int = 0,
) -> None:
    """`build(*vars)` returns a node; we check d sum(node * R)/d each input against finite differences."""
    g = ComputingGraph()
    inputs = [opr.shared(g, np.asarray(a, np.float64), f"in{i}") for i, a in enumerate(arrays)]
    out = build(*inputs)
    rng = np.random.default_rng(seed)
    weights = g.constant(rng.standard_normal([d for d in out.shape]).astype(np.float64))
    loss = opr.sum(out * weights)
    grads = grad(loss, inputs)
    func = g.compile([loss, *grads])
    results = func.execute()
    for var, analytic in zip(inputs, results[1:]):
        numeric = np.zeros_like(var.value)
        flat = var.value.reshape(-1)
        for j in range(flat.size):
            old = flat[j]
            flat[j] = old + eps
            up = func.execute()[0]
            flat[j] = old - eps
            down = func.execute()[0]
            flat[j] = old
            numeric.reshape(-1)[j] = (up - down) / (2 * eps)
        np.testing.assert_allclose(
            analytic, numeric, rtol=rtol, atol=atol, err_msg=f"gradient of input {var.name} (shape {var.shape})"
        )

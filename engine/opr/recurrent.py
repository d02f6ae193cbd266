"""GRU and LSTM as compositions of operators, unrolled over a sequence length fixed when the
graph is built (the batch size may still be fed late). Every step is ordinary matrix products,
sigmoids and tanhs, so the gradient (backpropagation through time) is autodiff's own.

The input projection of all steps is one matrix product before the loop; each step then adds
its hidden state's projection. Weights are stacked per gate as ONNX and PyTorch store them;
`order` names the gates in the order they are stacked (ONNX GRU "zrh", PyTorch "rzh"; ONNX
LSTM "iofc", PyTorch "ifco").
"""

from __future__ import annotations

from ..graph import ShapeError, SymbolVar
from .elemwise import Add, Mul, Sigmoid, Sub, Tanh
from .matmul import MatrixMul
from .shape import Concat, Reshape, Slice


def _gates(v: SymbolVar, order: str, hidden: int, axis: int) -> dict[str, SymbolVar]:
    return {g: Slice.make(v, axis=axis, start=k * hidden, stop=(k + 1) * hidden) for k, g in enumerate(order)}


def _check(kind: str, xs: list[SymbolVar], w: SymbolVar, r: SymbolVar, n_gates: int) -> int:
    hidden, features = r.shape[1], xs[0].shape[1]
    if w.shape != (n_gates * hidden, features) or r.shape != (n_gates * hidden, hidden):
        raise ShapeError(
            f"{kind}: weights {w.shape} and {r.shape} must be ({n_gates}*hidden, {features}) and "
            f"({n_gates}*hidden, hidden) for steps of {xs[0].shape}"
        )
    return hidden


def steps_of(x: SymbolVar | list[SymbolVar]) -> list[SymbolVar]:
    """A (steps, batch, features) tensor as its per-step (batch, features) slices; a list of
    steps (a lower layer's states) is used as it is, so no gradient is scattered back through
    slices of one big tensor (that would cost steps x the sequence per step)."""
    if isinstance(x, list):
        return x
    if x.ndim != 3 or x.shape[0] is None:
        raise ShapeError(f"recurrent: input must be (steps, batch, features) with static steps, got {x.shape}")
    return [Reshape.make(Slice.make(x, axis=0, start=t, stop=t + 1), [-1, x.shape[2]]) for t in range(x.shape[0])]


def _projected_inputs(xs: list[SymbolVar], w: SymbolVar, bias: SymbolVar | None, reverse: bool) -> list[SymbolVar]:
    """x_t @ wᵀ (+ bias) for every step, in processing order, each (batch, gates*hidden)."""
    order = xs[::-1] if reverse else xs
    projected = [MatrixMul.make(x, w, transpose_b=True) for x in order]
    return projected if bias is None else [Add.make(p, bias) for p in projected]


def _sum(*terms: SymbolVar | None) -> SymbolVar:
    present = [t for t in terms if t is not None]
    total = present[0]
    for t in present[1:]:
        total = Add.make(total, t)
    return total


def stack(states: list[SymbolVar]) -> SymbolVar:
    """Per-step states (batch, hidden) as one (steps, batch, hidden) tensor."""
    return Concat.make([Reshape.make(h, [1, -1, h.shape[1]]) for h in states], axis=0)


def gru(
    x: SymbolVar | list[SymbolVar],
    w: SymbolVar,
    r: SymbolVar,
    w_bias: SymbolVar | None = None,
    r_bias: SymbolVar | None = None,
    h0: SymbolVar | None = None,
    order: str = "zrh",
    linear_before_reset: bool = True,
    reverse: bool = False,
) -> tuple[list[SymbolVar], SymbolVar]:
    """(the states of every step in time order, the last state) of a GRU over x, (steps, batch,
    features) or a list of steps; each state is (batch, hidden).

    z = σ(x Wz + h Rz + bz), r = σ(x Wr + h Rr + br); the candidate is tanh(x Wh + r ⊙ (h Rh + Rbh)
    + Wbh) with linear_before_reset (PyTorch's GRU), else tanh(x Wh + (r ⊙ h) Rh + bh);
    h' = (1 - z) ⊙ candidate + z ⊙ h. A missing h0 is zeros.
    """
    xs = steps_of(x)
    hidden = _check("gru", xs, w, r, 3)
    if sorted(order) != sorted("zrh"):
        raise ShapeError(f"gru: gate order {order!r} must name z, r and h once each")
    recurrent = _gates(r, order, hidden, axis=0) if not linear_before_reset else {}
    rb = None if r_bias is None else _gates(r_bias, order, hidden, axis=0)
    bias = w_bias
    if rb is not None:  # the z and r gates' recurrent biases join the input projection's, once
        zr = Concat.make([rb[g] if g != "h" else Mul.make(rb[g], 0.0) for g in order], axis=0)
        bias = zr if bias is None else Add.make(bias, zr)
    h, states = h0, []
    for xw in _projected_inputs(xs, w, bias, reverse):
        xg = _gates(xw, order, hidden, axis=1)
        hr = {} if h is None else _gates(MatrixMul.make(h, r, transpose_b=True), order, hidden, axis=1)
        z, reset = (Sigmoid.make(_sum(xg[g], hr.get(g))) for g in "zr")
        if linear_before_reset or h is None:
            inner = hr.get("h")
            if rb is not None:
                inner = rb["h"] if inner is None else Add.make(inner, rb["h"])
            candidate = xg["h"] if inner is None else Add.make(xg["h"], Mul.make(reset, inner))
        else:
            candidate = Add.make(xg["h"], MatrixMul.make(Mul.make(reset, h), recurrent["h"], transpose_b=True))
            candidate = candidate if rb is None else Add.make(candidate, rb["h"])
        candidate = Tanh.make(candidate)
        h = (
            Mul.make(Sub.make(1.0, z), candidate)
            if h is None
            else Add.make(candidate, Mul.make(z, Sub.make(h, candidate)))
        )
        states.append(h)
    return (states[::-1] if reverse else states), h


def lstm(
    x: SymbolVar | list[SymbolVar],
    w: SymbolVar,
    r: SymbolVar,
    w_bias: SymbolVar | None = None,
    r_bias: SymbolVar | None = None,
    h0: SymbolVar | None = None,
    c0: SymbolVar | None = None,
    order: str = "iofc",
    reverse: bool = False,
) -> tuple[list[SymbolVar], SymbolVar, SymbolVar]:
    """(every step's hidden state in time order, last hidden state, last cell state) of an LSTM:
    i, f, o = σ(x W + h R + b), c' = f ⊙ c + i ⊙ tanh(x Wc + h Rc + bc), h' = o ⊙ tanh(c')."""
    xs = steps_of(x)
    hidden = _check("lstm", xs, w, r, 4)
    if sorted(order) != sorted("iofc"):
        raise ShapeError(f"lstm: gate order {order!r} must name i, o, f and c once each")
    bias = w_bias if r_bias is None else r_bias if w_bias is None else Add.make(w_bias, r_bias)
    h, c, states = h0, c0, []
    for xw in _projected_inputs(xs, w, bias, reverse):
        pre = xw if h is None else Add.make(xw, MatrixMul.make(h, r, transpose_b=True))
        g = _gates(pre, order, hidden, axis=1)
        i, f, o = Sigmoid.make(g["i"]), Sigmoid.make(g["f"]), Sigmoid.make(g["o"])
        new = Mul.make(i, Tanh.make(g["c"]))
        c = new if c is None else Add.make(Mul.make(f, c), new)
        h = Mul.make(o, Tanh.make(c))
        states.append(h)
    return (states[::-1] if reverse else states), h, c

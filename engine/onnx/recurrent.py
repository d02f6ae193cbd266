"""ONNX's GRU and LSTM nodes (what PyTorch's exporters emit for nn.GRU / nn.LSTM) as the
engine's unrolled compositions (engine/opr/recurrent.py): the number of steps is fixed by
the input's shape when the model is imported; the batch may be fed at run time. Weights stay
the ONNX initializers (W, R, B), so fine-tuning trains them and export writes them back."""

from __future__ import annotations

from typing import Any

from .. import opr
from ..graph import SymbolVar
from ..opr.recurrent import gru as gru_steps
from ..opr.recurrent import lstm as lstm_steps
from ..opr.recurrent import stack, steps_of

DEFAULT_ACTIVATIONS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


def _input(node: Any, i: int) -> str | None:
    return node.input[i] if len(node.input) > i and node.input[i] else None


def _direction(im: Any, var: SymbolVar, d: int, shape: list[int]) -> SymbolVar:
    """Direction d's slice of a (directions, ...) tensor, reshaped to `shape`."""
    return opr.reshape(opr.Slice.make(var, axis=0, start=d, stop=d + 1), shape)


def _common(im: Any, node: Any, kind: str) -> tuple[dict, list[SymbolVar], list[bool], int]:
    a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in im.attrs().items()}
    activations = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    if activations and activations != DEFAULT_ACTIVATIONS[kind] * (len(activations) // len(DEFAULT_ACTIVATIONS[kind])):
        raise im.fail(f"{kind} activations {activations} are not supported (only {DEFAULT_ACTIVATIONS[kind]})")
    if "clip" in a:
        raise im.fail(f"{kind} with clip is not supported")
    if _input(node, 4):
        raise im.fail(f"{kind} with sequence_lens is not supported (every sequence has the input's length)")
    x = im.var(node.input[0])
    if a.get("layout", 0):
        x = opr.transpose(x, (1, 0, 2))
    if x.ndim != 3 or x.shape[0] is None:
        raise im.fail(f"{kind} needs a (steps, batch, features) input with a static number of steps, got {x.shape}")
    direction = a.get("direction", "forward")
    reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if reverse is None:
        raise im.fail(f"{kind} direction {direction!r} is not supported")
    hidden = int(a.get("hidden_size", im.var(node.input[2]).shape[-1]))
    return a, steps_of(x), reverse, hidden


def _outputs(im: Any, node: Any, seqs: list[list[SymbolVar]], finals: list[list[SymbolVar]], layout: int) -> list:
    hidden = seqs[0][0].shape[1]
    y = opr.concat([opr.reshape(stack(s), (len(s), 1, -1, hidden)) for s in seqs], axis=1)  # (T, dirs, N, H)
    if layout:
        y = opr.transpose(y, (2, 0, 1, 3))
    outs = [y]
    for states in finals:  # Y_h (and Y_c): (dirs, N, H)
        last = opr.concat([opr.reshape(h, (1, -1, hidden)) for h in states], axis=0)
        outs.append(opr.transpose(last, (1, 0, 2)) if layout else last)
    return outs[: len(node.output)]


def gru(im: Any, node: Any) -> list[SymbolVar]:
    a, x, reverse, hidden = _common(im, node, "GRU")
    w, r = im.var(node.input[1]), im.var(node.input[2])
    b = im.var(node.input[3]) if _input(node, 3) else None
    h0 = im.var(node.input[5]) if _input(node, 5) else None
    if h0 is not None and a.get("layout", 0):
        h0 = opr.transpose(h0, (1, 0, 2))
    seqs, finals = [], []
    for d, backwards in enumerate(reverse):
        bd = None if b is None else _direction(im, b, d, [6 * hidden])
        seq, h = gru_steps(
            x,
            _direction(im, w, d, [3 * hidden, x[0].shape[1]]),
            _direction(im, r, d, [3 * hidden, hidden]),
            None if bd is None else opr.Slice.make(bd, axis=0, start=0, stop=3 * hidden),
            None if bd is None else opr.Slice.make(bd, axis=0, start=3 * hidden, stop=6 * hidden),
            None if h0 is None else _direction(im, h0, d, [-1, hidden]),
            order="zrh",
            linear_before_reset=bool(a.get("linear_before_reset", 0)),
            reverse=backwards,
        )
        seqs.append(seq)
        finals.append(h)
    return _outputs(im, node, seqs, [finals], a.get("layout", 0))


def lstm(im: Any, node: Any) -> list[SymbolVar]:
    a, x, reverse, hidden = _common(im, node, "LSTM")
    if _input(node, 7) or a.get("input_forget", 0):
        raise im.fail("LSTM with peepholes or coupled input-forget gates is not supported")
    w, r = im.var(node.input[1]), im.var(node.input[2])
    b = im.var(node.input[3]) if _input(node, 3) else None
    h0 = im.var(node.input[5]) if _input(node, 5) else None
    c0 = im.var(node.input[6]) if _input(node, 6) else None
    if a.get("layout", 0):
        h0 = None if h0 is None else opr.transpose(h0, (1, 0, 2))
        c0 = None if c0 is None else opr.transpose(c0, (1, 0, 2))
    seqs, hs, cs = [], [], []
    for d, backwards in enumerate(reverse):
        bd = None if b is None else _direction(im, b, d, [8 * hidden])
        seq, h, c = lstm_steps(
            x,
            _direction(im, w, d, [4 * hidden, x[0].shape[1]]),
            _direction(im, r, d, [4 * hidden, hidden]),
            None if bd is None else opr.Slice.make(bd, axis=0, start=0, stop=4 * hidden),
            None if bd is None else opr.Slice.make(bd, axis=0, start=4 * hidden, stop=8 * hidden),
            None if h0 is None else _direction(im, h0, d, [-1, hidden]),
            None if c0 is None else _direction(im, c0, d, [-1, hidden]),
            order="iofc",
            reverse=backwards,
        )
        seqs.append(seq)
        hs.append(h)
        cs.append(c)
    return _outputs(im, node, seqs, [hs, cs], a.get("layout", 0))

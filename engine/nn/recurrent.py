"""`GRU` and `LSTM` layers with PyTorch's parameters (weight_ih_l0, weight_hh_l0, bias_ih_l0,
bias_hh_l0 per layer; gates stacked r,z,n and i,f,g,o), unrolled over a sequence length fixed
when the model is built (engine/opr/recurrent.py). Like PyTorch they return a tuple:
GRU -> (output, h_n), LSTM -> (output, (h_n, c_n)); inputs start from zero states."""

from __future__ import annotations

from .. import opr
from ..graph import ShapeError, SymbolVar
from ..opr.recurrent import gru, lstm, stack
from .layers import _uniform
from .module import Module, Parameter


class _Recurrent(Module):
    gates = 0
    kind = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first = num_layers, batch_first
        n = self.gates * hidden_size
        for layer in range(num_layers):
            inputs = input_size if layer == 0 else hidden_size
            setattr(self, f"weight_ih_l{layer}", Parameter(_uniform((n, inputs), hidden_size)))
            setattr(self, f"weight_hh_l{layer}", Parameter(_uniform((n, hidden_size), hidden_size)))
            setattr(self, f"bias_ih_l{layer}", Parameter(_uniform((n,), hidden_size)))
            setattr(self, f"bias_hh_l{layer}", Parameter(_uniform((n,), hidden_size)))

    def _sequence(self, x: SymbolVar) -> SymbolVar:
        """x as (steps, batch, features)."""
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ShapeError(f"{self.kind}: input must be 3-D with {self.input_size} features, got {x.shape}")
        return opr.transpose(x, (1, 0, 2)) if self.batch_first else x

    def _params(self, x: SymbolVar, layer: int) -> list[SymbolVar]:
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return [getattr(self, f"{name}_l{layer}").in_graph(x.graph) for name in names]

    def _output(self, seq: SymbolVar) -> SymbolVar:
        return opr.transpose(seq, (1, 0, 2)) if self.batch_first else seq

    @staticmethod
    def _stack_last(states: list[SymbolVar]) -> SymbolVar:
        return opr.concat([opr.reshape(h, (1, -1, h.shape[1])) for h in states], axis=0)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, batch_first={self.batch_first}"


class GRU(_Recurrent):
    gates, kind = 3, "GRU"

    def forward(self, x: SymbolVar) -> tuple[SymbolVar, SymbolVar]:
        seq, last = self._sequence(x), []
        for layer in range(self.num_layers):  # each layer reads the one below step by step
            seq, h = gru(seq, *self._params(x, layer), order="rzh", linear_before_reset=True)
            last.append(h)
        return self._output(stack(seq)), self._stack_last(last)


class LSTM(_Recurrent):
    gates, kind = 4, "LSTM"

    def forward(self, x: SymbolVar) -> tuple[SymbolVar, tuple[SymbolVar, SymbolVar]]:
        seq, hs, cs = self._sequence(x), [], []
        for layer in range(self.num_layers):
            seq, h, c = lstm(seq, *self._params(x, layer), order="ifco")
            hs.append(h)
            cs.append(c)
        return self._output(stack(seq)), (self._stack_last(hs), self._stack_last(cs))

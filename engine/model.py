"""`Model`: a forward graph with named inputs, outputs and parameters.

It is what a model file holds and what a loss and an optimizer are attached to; built by
hand from `opr` (see `engine.models.lenet`), by `engine.nn` modules, or loaded from a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .graph import ComputingGraph, GraphError, SymbolVar


@dataclass
class Model:
    graph: ComputingGraph
    inputs: dict[str, SymbolVar]
    outputs: dict[str, SymbolVar]
    params: dict[str, SymbolVar]  # every shared tensor of the model: weights and buffers
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable(self) -> list[str]:
        return [n for n, v in self.params.items() if v.op.trainable]

    @property
    def input(self) -> SymbolVar:
        return next(iter(self.inputs.values()))

    @property
    def output(self) -> SymbolVar:
        return next(iter(self.outputs.values()))

    def num_parameters(self, trainable_only: bool = True) -> int:
        names = self.trainable if trainable_only else list(self.params)
        return int(sum(self.params[n].value.size for n in names))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {n: v.value.copy() for n, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Copy arrays into the parameters in place (compiled functions keep seeing them)."""
        unknown = sorted(set(state) - set(self.params))
        missing = sorted(set(self.params) - set(state))
        if strict and (unknown or missing):
            raise GraphError(f"load_state_dict: unknown {unknown}, missing {missing}")
        for name, value in state.items():
            if name not in self.params:
                continue
            var = self.params[name]
            value = np.asarray(value)
            if value.shape != var.value.shape:
                raise GraphError(f"load_state_dict: {name} has shape {value.shape}, the model needs {var.value.shape}")
            np.copyto(var.value, value.astype(var.value.dtype, copy=False))

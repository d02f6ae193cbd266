"""`Module`: PyTorch-style layers over the static graph.

A module owns named arrays (parameters and buffers) and says, in `forward`, which operators
to add to a graph. `module.build(input_shape)` creates the graph once and returns a `Model`:
from then on the module's arrays *are* the graph's shared tensors (same memory), so training
the model through a `Trainer` is visible in `module.state_dict()`.

Train/eval mode decides what `build` emits: in training mode, dropout and batch norm add both
branches behind a `ModeSelect` (the compiler picks one per compiled function); in eval mode
only the inference branch is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .. import opr
from ..graph import ComputingGraph, GraphError, SymbolVar
from ..model import Model


class Parameter:
    """A named array of a module. `trainable=False` (frozen) means no gradient and no optimizer state."""

    is_buffer = False

    def __init__(self, data: Any, trainable: bool = True) -> None:
        self.data = np.array(data, dtype=np.float32 if np.asarray(data).dtype.kind == "f" else None)
        self._trainable = bool(trainable) and not self.is_buffer
        self.var: SymbolVar | None = None  # the shared tensor it became in the last build

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = bool(value) and not self.is_buffer
        if self.var is not None:  # keep the built model's `Model.trainable` in step
            self.var.op.attrs["trainable"] = self._trainable

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def in_graph(self, graph: ComputingGraph) -> SymbolVar:
        """The shared tensor holding this array in `graph` (created by `Module.build`)."""
        if self.var is None or self.var.graph is not graph:
            raise GraphError(
                "this parameter has no tensor in the graph being built: add modules to a graph "
                "through Module.build(...) (or Module.attach(graph))"
            )
        return self.var

    def __repr__(self) -> str:
        kind = "Buffer" if self.is_buffer else "Parameter"
        frozen = "" if self.trainable or self.is_buffer else ", frozen"
        return f"{kind}(shape={self.shape}, dtype={self.data.dtype}{frozen})"


class Buffer(Parameter):
    """State that is saved but never trained (batch-norm running statistics)."""

    is_buffer = True


class Module:
    """Base class: assign `Parameter`s, `Buffer`s and sub-`Module`s as attributes; write `forward`."""

    def __init__(self) -> None:
        object.__setattr__(self, "_tensors", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_tensors" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        self._tensors.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._tensors[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # ----- the computation -----
    def forward(self, x: SymbolVar) -> SymbolVar:
        raise TypeError(f"{type(self).__name__} must define forward(x) to be called")

    def __call__(self, x: SymbolVar) -> SymbolVar:
        return self.forward(x)

    # ----- naming -----
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_tensors(self) -> Iterator[tuple[str, Parameter]]:
        """Parameters and buffers with dotted names ("0.weight", "conv1.bias"), in definition order."""
        for path, module in self.named_modules():
            for name, tensor in module._tensors.items():
                yield (f"{path}.{name}" if path else name), tensor

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        return ((n, t) for n, t in self.named_tensors() if not t.is_buffer)

    def named_buffers(self) -> Iterator[tuple[str, Parameter]]:
        return ((n, t) for n, t in self.named_tensors() if t.is_buffer)

    def trainable_names(self) -> list[str]:
        return [n for n, t in self.named_parameters() if t.trainable]

    def _lookup(self, path: str) -> Module | Parameter:
        target: Module | Parameter = self
        for part in path.split(".") if path else []:
            if not isinstance(target, Module):
                break
            nxt = target._modules.get(part) or target._tensors.get(part)
            if nxt is None:
                break
            target = nxt
        else:
            return target
        raise KeyError(f"no sub-module or parameter {path!r}; this module has {[n for n, _ in self.named_tensors()]}")

    # ----- state -----
    def state_dict(self) -> dict[str, np.ndarray]:
        return {name: t.data.copy() for name, t in self.named_tensors()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy arrays in place (a built model keeps seeing them). Keys as in PyTorch's state_dict."""
        tensors = dict(self.named_tensors())
        unknown, missing = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
        if strict and (unknown or missing):
            raise GraphError(f"load_state_dict: unknown {unknown}, missing {missing}")
        for name, value in state.items():
            if name not in tensors:
                continue
            value = np.asarray(value)
            if value.shape != tensors[name].shape:
                raise GraphError(
                    f"load_state_dict: {name} has shape {value.shape}, the module needs {tensors[name].shape}"
                )
            np.copyto(tensors[name].data, value.astype(tensors[name].data.dtype, copy=False))

    # ----- modes -----
    def train(self, mode: bool = True) -> Module:
        for _, module in self.named_modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def freeze(self, *paths: str) -> Module:
        """Stop training the named sub-modules/parameters (all of this module when none are named)."""
        self._set_trainable(paths, False)
        return self

    def unfreeze(self, *paths: str) -> Module:
        self._set_trainable(paths, True)
        return self

    def _set_trainable(self, paths: Sequence[str], value: bool) -> None:
        for path in paths or ("",):
            target = self._lookup(path)
            tensors = [t for _, t in target.named_parameters()] if isinstance(target, Module) else [target]
            for tensor in tensors:
                tensor.trainable = value

    # ----- graph -----
    def attach(self, graph: ComputingGraph) -> dict[str, SymbolVar]:
        """Create a shared tensor per parameter/buffer in `graph`; the arrays become the graph's own."""
        params = {}
        for name, tensor in self.named_tensors():
            var = opr.shared(graph, tensor.data, name, trainable=tensor.trainable)
            tensor.data, tensor.var = var.value, var
            params[name] = var
        return params

    def build(
        self, input_shape: Sequence[int], dtype: str = "float32", input_name: str = "x", output_name: str = "logits"
    ) -> Model:
        """A `Model` computing this module on inputs of shape (batch, *input_shape)."""
        graph = ComputingGraph()
        params = self.attach(graph)
        x = opr.host2device(graph, (None, *input_shape), dtype, name=input_name)
        out = self(x)
        return Model(
            graph,
            inputs={input_name: x},
            outputs={output_name: out},
            params=params,
            metadata={
                "built_by": "engine.nn",
                "module": type(self).__name__,
                "mode": "train" if self.training else "eval",
            },
        )

    # ----- display -----
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        if not self._modules:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({name}): " + repr(child).replace("\n", "\n  ") for name, child in self._modules.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


class Sequential(Module):
    """Modules applied in order; they are named "0", "1", ... (so weights are "0.weight", ...)."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: item {i} is {type(module).__name__}, not a Module")
            setattr(self, str(i), module)

    def forward(self, x: SymbolVar) -> SymbolVar:
        for module in self._modules.values():
            x = module(x)
        return x

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

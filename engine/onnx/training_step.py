"""The training step as one plain ONNX graph (opset 17, standard domain): any ONNX runtime trains.

    export_training_step(model, "step.onnx", optimizer="adam")

The graph is the engine's own: `build_training_graph` adds the loss, the symbolic gradients
and the optimizer's updates exactly as `Trainer` does, and every node of that graph (before
the compiler's fusions, with its closed-form softmax cross-entropy backward) is lowered by
the operator's entry in `LOWERINGS` (engine/onnx/lowerings.py, gradients.py).

Inputs: the model's inputs, `label`, every model tensor the step reads by its model name,
`state/<weight>/<slot>` (optimizer state), `prox_anchor/<weight>` (FedProx only),
`dropout_mask/<k>` (one per dropout), `lr`. Outputs: `loss`, `new/<name>` for every tensor the
step changes, `new_state/<weight>/<slot>`. docs/training-step.md is the full contract.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..compiler.fusion import softmax_cross_entropy
from ..compiler.program import build_program
from ..graph import SymbolVar
from ..loss import ILoss
from ..model import Model
from ..optimizer import IOptimizer, Optimizer, make_optimizer
from ..serialize.modelfile import dumps, loads
from ..training_graph import LABEL, TrainingGraph, build_training_graph
from . import gradients as _gradients  # noqa: F401  (registers the backward lowerings)
from . import modern_gradients as _modern_gradients  # noqa: F401  (and those of the modern operators)
from .exporter import OPSET
from .importer import OnnxError
from .lowerings import Lowerer

FORMAT = "pocketfed-training-step"
FORMAT_VERSION = 1
RESERVED = (LABEL, "lr", "loss")  # graph input/output names the interface claims
RESERVED_PREFIXES = ("new/", "state/", "new_state/", "prox_anchor/", "dropout_mask/")


def export_training_step(
    model: Model,
    path: str | os.PathLike | None = None,
    optimizer: str | IOptimizer = "sgd",
    loss: str | ILoss = "cross_entropy",
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    trainable: Sequence[str] | None = None,
    prox_mu: float = 0.0,
    initial_values: bool = False,
) -> bytes:
    """One training step of `model` as ONNX bytes (also written to `path` when given).

    `optimizer` is "sgd", "sgd-momentum", "adam" (built with `lr`, `momentum`, `weight_decay`)
    or an engine optimizer. `initial_values` stores the model's weights, zero optimizer
    state and `lr` as the inputs' defaults (a bigger but self-contained file); without it
    the file holds no weights and serves every version of the same architecture.
    The model itself is not touched: the step is built on a copy.
    """
    from ..serialize.container import write_atomic

    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, lr, momentum=momentum, weight_decay=weight_decay)
    elif isinstance(optimizer, Optimizer):
        optimizer = optimizer.fresh()
    copy = loads(dumps(model))
    training = build_training_graph(copy, loss, optimizer, trainable, prox_mu)
    data = _StepExporter(training, loss, initial_values).run().SerializeToString()
    if path is not None:
        write_atomic(path, data)
    return data


class _StepExporter:
    def __init__(self, training: TrainingGraph, loss: str | ILoss, initial_values: bool) -> None:
        self.training, self.initial_values = training, initial_values
        self.loss_name = loss if isinstance(loss, str) else type(loss).__name__
        self.lw = Lowerer()
        self.roles = self._roles()

    def _roles(self) -> dict[int, tuple[int, str]]:
        """SymbolVar id -> (rank in the interface's order, interface name) for every source it names."""
        t = self.training
        model, graph = t.model, t.model.graph
        taken = [n for n in [*model.inputs, *model.params] if n in RESERVED or n.startswith(RESERVED_PREFIXES)]
        if taken:
            raise OnnxError(f"model input or tensor names {taken} clash with the training-step interface")
        roles: dict[int, tuple[int, str]] = {}
        for name, var in model.inputs.items():
            roles[var.id] = (0, name)
        roles[t.label.id] = (1, LABEL)
        for name, var in model.params.items():
            roles[var.id] = (2, name)
        weights = {w.name for w in t.weights}
        for key, var in getattr(t.optimizer, "state", {}).items():
            weight, slot = key.rsplit(".", 1)
            if var.graph is graph and weight in weights:
                roles[var.id] = (3, f"state/{weight}/{slot}")
        for name, var in t.anchors.items():
            roles[var.id] = (4, f"prox_anchor/{name}")
        if isinstance(t.optimizer, Optimizer):
            roles[t.optimizer.lr_var(graph).id] = (6, "lr")  # rank 5: dropout masks
        return roles

    def _source_name(self, var: SymbolVar) -> tuple[int, str]:
        role = self.roles.get(var.id)
        if role is None:
            raise OnnxError(
                f"the training graph reads {var!r}, which is neither a model input or tensor, "
                "optimizer state, a FedProx anchor nor the learning rate"
            )
        return role

    def run(self) -> Any:
        t, lw = self.training, self.lw
        helper = lw.onnx.helper
        program = build_program([t.loss], t.updates, training=True)
        softmax_cross_entropy(program)  # the closed-form backward of log_softmax + pick
        names: dict[int, str] = {}
        inputs: list[tuple[tuple[int, int], str, tuple, np.dtype, np.ndarray | None]] = []
        for node in program.nodes:
            if node.kind in ("input", "shared"):
                var = node.origin
                rank, name = self._source_name(var)
                names[id(node)] = name
                lw.dtypes[name] = node.dtype
                inputs.append(((rank, var.id), name, var.shape, var.dtype, var.value))
            elif node.kind == "const":
                names[id(node)] = lw.constant(node.value)
            else:
                out = lw.fresh(node.op.type_name)
                lw.lower(node, [names[id(i)] for i in node.inputs], out)
                names[id(node)] = out
        inputs += [((5, k), name, shape, dtype, None) for k, (name, shape, dtype, _) in enumerate(lw.extra_inputs)]
        inputs.sort(key=lambda item: item[0])
        outputs = [((0, 0), "loss", program.outputs[0], t.loss.shape, t.loss.dtype)]
        for dest, node in program.updates:  # state "state/w/slot" -> "new_state/w/slot", tensors "w" -> "new/w"
            rank, name = self._source_name(dest)
            outputs.append(
                ((rank, dest.id), f"new_{name}" if rank == 3 else f"new/{name}", node, dest.shape, dest.dtype)
            )
        outputs.sort(key=lambda item: item[0])
        for _, out_name, node, _, dtype in outputs:
            lw.add("Identity", [lw.cast(names[id(node)], dtype)], out_name)
        graph_inputs = [self._value_info(name, shape, dtype) for _, name, shape, dtype, _ in inputs]
        graph_outputs = [self._value_info(name, shape, dtype) for _, name, _, shape, dtype in outputs]
        initializers = list(lw.initializers)
        if self.initial_values:  # defaults for the tensors, the optimizer state and lr
            initializers += [
                lw.onnx.numpy_helper.from_array(np.asarray(v), n) for _, n, _, _, v in inputs if v is not None
            ]
        graph = helper.make_graph(lw.nodes, "pocketfed_training_step", graph_inputs, graph_outputs, initializers)
        proto = helper.make_model(graph, producer_name="pocketfed", opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = min(proto.ir_version, 8)  # readable by onnxruntime releases of the last years
        helper.set_model_props(
            proto, {"pocketfed.training_step": json.dumps(self._interface(graph_inputs, graph_outputs))}
        )
        lw.onnx.checker.check_model(proto, full_check=True)
        return proto

    def _value_info(self, name: str, shape: tuple, dtype: np.dtype) -> Any:
        """Sizes fed late are symbolic: "N" for the batch (axis 0), "<name>:<axis>" elsewhere."""
        dims = [("N" if i == 0 else f"{name}:{i}") if d is None else int(d) for i, d in enumerate(shape)]
        helper = self.lw.onnx.helper
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), dims)

    def _interface(self, inputs: list, outputs: list) -> dict[str, Any]:
        """What the file's metadata says about its interface (docs/training-step.md)."""
        opt = self.training.optimizer
        settings = {k: v for k, v in vars(opt).items() if not k.startswith("_") and k not in ("state", "lr")}
        if isinstance(opt, Optimizer):  # the `lr` input is what counts; this is only the export's default
            settings["default_lr"] = opt.lr
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "optimizer": {"type": type(opt).__name__, **{k: _plain(v) for k, v in settings.items()}},
            "loss": self.loss_name,
            "model_inputs": list(self.training.model.inputs),
            "weights": [w.name for w in self.training.weights],
            "dropout_masks": [{"name": name, **info} for name, _, _, info in self.lw.extra_inputs],
            "inputs": [v.name for v in inputs],
            "outputs": [v.name for v in outputs],
        }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

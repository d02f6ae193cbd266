"""`Model` -> ONNX: the inference graph (eval branch of every train/eval switch, no updates),
one ONNX node per engine operator, weights as initializers under their engine names.

The batch size stays dynamic ("N") wherever the engine graph has it fed late.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import opr
from ..data.preprocessing import METADATA_KEY as PREPROCESSING_KEY
from ..graph import SourceKind, SymbolVar
from ..model import Model
from ..opr.base import Operator
from ..serialize.modelfile import collect_nodes
from .importer import OnnxError, require_onnx

OPSET = 17
ONNX_PREPROCESSING = "pocketfed.preprocessing"  # metadata_props key


class _Exporter:
    def __init__(self, model: Model) -> None:
        self.onnx = require_onnx()
        self.model = model
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.names: dict[int, str] = {}

    def name(self, var: SymbolVar) -> str:
        while isinstance(var.op, opr.ModeSelect):
            var = var.inputs[1]
        return self.names[var.id]

    def constant(self, value: np.ndarray, hint: str) -> str:
        name = f"{hint}_const{len(self.initializers)}"
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> None:
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [output], name=output, **attrs))

    def value_info(self, name: str, var: SymbolVar) -> Any:
        dtype = self.onnx.helper.np_dtype_to_tensor_dtype(var.dtype)
        dims = ["N" if d is None else d for d in var.shape]
        return self.onnx.helper.make_tensor_value_info(name, dtype, dims)

    def run(self) -> Any:
        helper = self.onnx.helper
        inputs = []
        for var in collect_nodes(self.model, inference_only=True):
            source = var.op.source_kind
            if source is SourceKind.INPUT:
                self.names[var.id] = var.name
                inputs.append(self.value_info(var.name, var))
            elif source is SourceKind.SHARED:
                self.names[var.id] = var.name
                self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(var.value), var.name))
            elif source is SourceKind.CONST:
                self.names[var.id] = self.constant(var.value, "c")
            else:
                kind = var.op.type_name
                emit = EMITTERS.get(type(var.op))
                if emit is None:
                    raise OnnxError(
                        f"cannot export operator {kind} to ONNX (node {var!r}); exportable: "
                        f"{', '.join(sorted(op.type_name for op in EMITTERS))}"
                    )
                out = f"{kind}_{var.id}"
                emit(self, var, [self.name(i) for i in var.inputs], out)
                self.names[var.id] = out
        outputs = []
        for out_name, var in self.model.outputs.items():
            self.add("Identity", [self.name(var)], out_name)
            outputs.append(self.value_info(out_name, var))
        graph = helper.make_graph(self.nodes, "pocketfed", inputs, outputs, self.initializers)
        proto = helper.make_model(graph, producer_name="pocketfed", opset_imports=[helper.make_opsetid("", OPSET)])
        if PREPROCESSING_KEY in self.model.metadata:  # what the model is fed travels inside the ONNX file too
            helper.set_model_props(proto, {ONNX_PREPROCESSING: json.dumps(self.model.metadata[PREPROCESSING_KEY])})
        proto.ir_version = min(proto.ir_version, 8)  # readable by onnxruntime releases of the last years
        self.onnx.checker.check_model(proto)
        return proto


# ----- emitters: (exporter, engine node, input names, output name) -----


def _same(op_type: str, **fixed: Any) -> Callable:
    return lambda ex, var, ins, out: ex.add(op_type, ins, out, **fixed)


def _conv(ex: _Exporter, var: SymbolVar, ins: list[str], out: str, group: int | None = None) -> None:
    a = var.op.attrs
    ex.add(
        "Conv",
        ins,
        out,
        kernel_shape=list(var.inputs[1].shape[2:]),
        strides=a["stride"],
        pads=a["padding"] * 2,
        dilations=a["dilation"],
        group=a["groups"] if group is None else group,
    )


def _pool(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    a = var.op.attrs
    geometry = dict(kernel_shape=a["window"], strides=a["stride"], pads=a["padding"] * 2)
    if a["mode"] == "max":
        ex.add("MaxPool", ins, out, **geometry)
    else:
        ex.add("AveragePool", ins, out, count_include_pad=int(a["mode"] == "average"), **geometry)


def _matmul(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    a = var.op.attrs
    if a["transpose_a"] or a["transpose_b"]:
        ex.add("Gemm", ins, out, transA=int(a["transpose_a"]), transB=int(a["transpose_b"]))
    else:
        ex.add("MatMul", ins, out)


def _reshape(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    ex.add("Reshape", [ins[0], ex.constant(np.asarray(var.op.attrs["shape"], np.int64), "shape")], out)


def _axis(op_type: str) -> Callable:
    return lambda ex, var, ins, out: ex.add(op_type, ins, out, axis=int(var.op.attrs["axis"]))


def _reduce(op_type: str, axes_as_input: bool) -> Callable:
    def emit(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
        axes, keep = list(var.op.attrs["axes"]), int(var.op.attrs["keepdims"])
        if axes_as_input:
            ex.add(op_type, [ins[0], ex.constant(np.asarray(axes, np.int64), "axes")], out, keepdims=keep)
        else:
            ex.add(op_type, ins, out, axes=axes, keepdims=keep)

    return emit


def _cast(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    ex.add("Cast", ins, out, to=ex.onnx.helper.np_dtype_to_tensor_dtype(var.dtype))


def _transposed(ex: _Exporter, name: str, ndim: int, flag: bool) -> str:
    if not flag:
        return name
    perm = list(range(ndim - 2)) + [ndim - 1, ndim - 2]
    out = f"{name}_T{len(ex.nodes)}"
    ex.add("Transpose", [name], out, perm=perm)
    return out


def _batched_matmul(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    a, b = var.inputs
    ex.add(
        "MatMul",
        [_transposed(ex, ins[0], a.ndim, var.op.transpose_a), _transposed(ex, ins[1], b.ndim, var.op.transpose_b)],
        out,
    )


def _layer_norm(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    x = var.inputs[0]
    axis = var.op.axis % x.ndim
    ones = np.ones(x.shape[axis:], x.dtype)
    ex.add("LayerNormalization", [ins[0], ex.constant(ones, "ln_scale")], out, axis=axis, epsilon=float(var.op.eps))


def _gelu(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    """x * 0.5 * (1 + erf(x / sqrt(2))): opset 17 has no Gelu (PyTorch exports the same chain)."""
    dtype = var.dtype
    scaled, erf, one_plus, half = (f"{out}_{k}" for k in ("scaled", "erf", "one_plus", "half"))
    ex.add("Mul", [ins[0], ex.constant(np.asarray(1 / np.sqrt(2), dtype), "c")], scaled)
    ex.add("Erf", [scaled], erf)
    ex.add("Add", [erf, ex.constant(np.asarray(1, dtype), "c")], one_plus)
    ex.add("Mul", [ins[0], ex.constant(np.asarray(0.5, dtype), "c")], half)
    ex.add("Mul", [half, one_plus], out)


def _silu(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    ex.add("Sigmoid", ins, f"{out}_sigmoid")
    ex.add("Mul", [ins[0], f"{out}_sigmoid"], out)


def _clip(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    bounds = ["" if v is None else ex.constant(np.asarray(v, var.dtype), "clip") for v in (var.op.low, var.op.high)]
    ex.add("Clip", [ins[0], *bounds], out)


def _slice(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    a = var.op.attrs
    consts = [ex.constant(np.asarray([v], np.int64), k) for k, v in (("starts", a["start"]), ("ends", a["stop"]))]
    ex.add("Slice", [ins[0], *consts, ex.constant(np.asarray([a["axis"]], np.int64), "axes")], out)


def _broadcast_to(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    """Expand to the static sizes, with a run-time size read from the reference input's shape."""
    parts = []
    for d, axis in zip(var.op.shape, var.op.ref_axes):
        if d is not None:
            parts.append(ex.constant(np.asarray([d], np.int64), "dim"))
            continue
        shape = f"{out}_shape"
        if not any(n.output[0] == shape for n in ex.nodes):
            ex.add("Shape", [ins[1]], shape)
        part = f"{out}_dim{len(parts)}"
        starts, ends = (ex.constant(np.asarray([v], np.int64), "s") for v in (axis, axis + 1))
        ex.add("Slice", [shape, starts, ends], part)
        parts.append(part)
    ex.add("Concat", parts, f"{out}_target", axis=0)
    ex.add("Expand", [ins[0], f"{out}_target"], out)


def _depthwise(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    _conv(ex, var, ins, out, group=int(var.inputs[0].shape[1]))  # one group per input channel


def _resize(ex: _Exporter, var: SymbolVar, ins: list[str], out: str) -> None:
    a = var.op.attrs
    batch_channels = f"{out}_nc"
    ex.add("Shape", [ins[0]], f"{out}_shape")
    starts, ends = (ex.constant(np.asarray([v], np.int64), "s") for v in (0, 2))
    ex.add("Slice", [f"{out}_shape", starts, ends], batch_channels)
    ex.add("Concat", [batch_channels, ex.constant(np.asarray(a["size"], np.int64), "size")], f"{out}_sizes", axis=0)
    ex.add(
        "Resize",
        [ins[0], "", "", f"{out}_sizes"],
        out,
        mode="nearest",
        coordinate_transformation_mode=a["coordinate"],
        nearest_mode=a["nearest"],
    )


EMITTERS: dict[type[Operator], Callable[[_Exporter, SymbolVar, list[str], str], None]] = {
    opr.BatchedMatrixMul: _batched_matmul,
    opr.LayerNorm: _layer_norm,
    opr.Erf: _same("Erf"),
    opr.Gelu: _gelu,
    opr.Silu: _silu,
    opr.Clip: _clip,
    opr.HardSigmoid: lambda ex, var, ins, out: ex.add("HardSigmoid", ins, out, alpha=var.op.alpha, beta=var.op.beta),
    opr.HardSwish: _same("HardSwish"),
    opr.Where: _same("Where"),
    opr.Less: _same("Less"),
    opr.LessEqual: _same("LessOrEqual"),
    opr.LogicalAnd: _same("And"),
    opr.Slice: _slice,
    opr.BroadcastTo: _broadcast_to,
    opr.DepthwiseConvolution: _depthwise,
    opr.ResizeNearest: _resize,
    opr.Convolution: _conv,
    opr.Pooling: _pool,
    opr.MatrixMul: _matmul,
    opr.Reshape: _reshape,
    opr.Add: _same("Add"),
    opr.Sub: _same("Sub"),
    opr.Mul: _same("Mul"),
    opr.Div: _same("Div"),
    opr.Pow: _same("Pow"),
    opr.Maximum: _same("Max"),
    opr.Neg: _same("Neg"),
    opr.Exp: _same("Exp"),
    opr.Log: _same("Log"),
    opr.Sqrt: _same("Sqrt"),
    opr.Abs: _same("Abs"),
    opr.Sign: _same("Sign"),
    opr.Relu: _same("Relu"),
    opr.Sigmoid: _same("Sigmoid"),
    opr.Tanh: _same("Tanh"),
    opr.Equal: _same("Equal"),
    opr.Greater: _same("Greater"),
    opr.GreaterEqual: _same("GreaterOrEqual"),
    opr.LogicalNot: _same("Not"),
    opr.Transpose: lambda ex, var, ins, out: ex.add("Transpose", ins, out, perm=var.op.attrs["perm"]),
    opr.Concat: _axis("Concat"),
    opr.Softmax: _axis("Softmax"),
    opr.LogSoftmax: _axis("LogSoftmax"),
    opr.Argmax: lambda ex, var, ins, out: ex.add("ArgMax", ins, out, axis=int(var.op.attrs["axis"]), keepdims=0),
    opr.Sum: _reduce("ReduceSum", True),
    opr.Mean: _reduce("ReduceMean", False),
    opr.Max: _reduce("ReduceMax", False),
    opr.Astype: _cast,
    opr.EmbeddingLookup: _same("Gather", axis=0),
}


def export_onnx(model: Model, path: str | os.PathLike | None = None) -> bytes:
    """The model's inference graph as ONNX (opset 17) bytes; also written to `path` when given."""
    from ..serialize.container import write_atomic

    data = _Exporter(model).run().SerializeToString()
    if path is not None:
        write_atomic(path, data)
    return data

"""ONNX -> `Model`: each ONNX node becomes engine operators; initializers become named weights.

Float initializers become shared tensors named as in the ONNX file (PyTorch exports keep
"conv1.weight"...), trainable unless they are batch-norm statistics; integer initializers and
`Constant` nodes stay known at build time, which is what `Reshape` needs for its target shape.
Shape chains (`x.view(x.size(0), -1)`) are evaluated at import time in `shapes.py`; Conv and
pooling padding the engine has no flag for (asymmetric, SAME, ceil_mode) is made explicit in
`spatial.py`. One converter function per ONNX operator, registered in CONVERTERS: read it like a table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import opr
from ..data.preprocessing import METADATA_KEY as PREPROCESSING_KEY
from ..data.preprocessing import NONE, Preprocessing
from ..graph import ComputingGraph, GraphError, SymbolVar
from ..model import Model
from ..serialize.modelfile import ModelFileError
from . import modern, recurrent, shapes, spatial


class OnnxError(ModelFileError):
    """An ONNX model cannot be imported or exported (unsupported operator, attribute or shape)."""


def require_onnx() -> Any:
    try:
        import onnx
    except ImportError:  # pragma: no cover - depends on the environment
        raise OnnxError("ONNX support needs the onnx package: pip install 'pocketfed[onnx]'") from None
    return onnx


class _Importer:
    """Holds the graph being built and what each ONNX value name maps to."""

    def __init__(self, proto: Any) -> None:
        self.onnx = require_onnx()
        self.proto = proto
        self.graph = ComputingGraph()
        self.vars: dict[str, SymbolVar] = {}  # ONNX value name -> node
        self.static: dict[str, np.ndarray] = {}  # ONNX value name -> value known at build time
        self.params: dict[str, SymbolVar] = {}
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.node: Any = None  # the ONNX node being converted, for error messages

    def fail(self, why: str) -> OnnxError:
        node = self.node
        return OnnxError(f"ONNX node {node.name or '(unnamed)'!r} ({node.op_type}): {why}")

    # ----- values -----
    def var(self, name: str, like: SymbolVar | None = None) -> SymbolVar:
        """The node for an ONNX value; build-time constants become graph constants (in `like`'s type)."""
        if name in self.vars:
            return self.vars[name]
        if name in self.static:
            value = self.static[name]
            if shapes.is_dynamic(value):
                raise self.fail(
                    f"shape {list(value)} holds a size fed at run time; it can only feed "
                    "Reshape (or Gather/Unsqueeze/Concat/Slice/Cast on shapes)"
                )
            if like is not None and like.dtype.kind == "f" and value.dtype.kind in "fiu":
                value = value.astype(like.dtype)
            return self.graph.constant(value)
        raise self.fail(f"input {name!r} is not produced by any earlier node")

    def constant_input(self, name: str, what: str) -> np.ndarray:
        if name in self.params:  # a float initializer used as an attribute (dynamo's Clip bounds)
            return np.asarray(self.params[name].value)
        if name not in self.static:
            raise self.fail(f"{what} must be a constant (an initializer or Constant node), got computed value {name!r}")
        return self.static[name]

    def attrs(self) -> dict[str, Any]:
        helper = self.onnx.helper
        return {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    # ----- the whole model -----
    def run(self) -> Model:
        g = self.proto.graph
        numpy_helper = self.onnx.numpy_helper
        for init in g.initializer:
            value = numpy_helper.to_array(init)
            if value.dtype.kind == "f":
                var = opr.shared(self.graph, value.astype(np.float32, copy=False), init.name)
                self.vars[init.name] = self.params[init.name] = var
            else:
                self.static[init.name] = value
        inputs = {}
        for value_info in g.input:
            if value_info.name in self.vars or value_info.name in self.static:
                continue  # old exporters list initializers as inputs too
            inputs[value_info.name] = self.vars[value_info.name] = self._input(value_info)
        for node in g.node:
            self.node = node
            converter = CONVERTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if converter is None:
                raise self.fail(
                    f"unsupported ONNX operator {node.op_type!r}"
                    + (f" in domain {node.domain!r}" if node.domain else "")
                    + f"; supported: {', '.join(sorted(CONVERTERS))}"
                )
            try:
                result = converter(self, node)
            except GraphError as exc:
                raise self.fail(str(exc)) from None
            results = result if isinstance(result, list) else [result]  # Split, GRU, LSTM: several outputs
            if len(results) < len([o for o in node.output if o]):
                raise self.fail(f"{len(node.output)} outputs, of which {len(results)} are supported")
            for name, value in zip(node.output, results):
                if isinstance(value, np.ndarray):
                    self.static[name] = value
                elif name:
                    self.vars[name] = value
        outputs = {o.name: self.var(o.name) for o in g.output}
        read = {id(i) for v in self.graph.nodes for i in v.inputs}
        self.params = {n: v for n, v in self.params.items() if id(v) in read}  # not initializers read as constants
        producer = f"{self.proto.producer_name} {self.proto.producer_version}".strip()
        return Model(
            self.graph,
            inputs=inputs,
            outputs=outputs,
            params=self.params,
            metadata={
                "source": "onnx",
                "onnx_opset": int(self.opset),
                "onnx_producer": producer,
                PREPROCESSING_KEY: self._preprocessing().to_metadata(),
            },
        )

    def _preprocessing(self) -> Preprocessing:
        """What a pocketfed export recorded; else none: an ONNX file says nothing of its inputs' scale."""
        props = {p.key: p.value for p in self.proto.metadata_props}
        if "pocketfed.preprocessing" not in props:
            return NONE
        try:
            return Preprocessing.from_metadata(json.loads(props["pocketfed.preprocessing"]))
        except ValueError as exc:
            raise OnnxError(f"ONNX metadata pocketfed.preprocessing: {exc}") from None

    def _input(self, value_info: Any) -> SymbolVar:
        tensor_type = value_info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        dtype = self.onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        return opr.host2device(self.graph, dims, dtype, name=value_info.name)


# ----- converters: (importer, node) -> SymbolVar, or an ndarray for a build-time constant -----


def _unary(fn: Callable[[SymbolVar], SymbolVar]) -> Callable:
    return lambda im, node: fn(im.var(node.input[0]))


def _binary(fn: Callable[[SymbolVar, SymbolVar], SymbolVar]) -> Callable:
    def convert(im: _Importer, node: Any) -> SymbolVar | np.ndarray:
        a_name, b_name = node.input
        if a_name in im.static and b_name in im.static:  # shape arithmetic on constants
            try:
                return np.asarray(fn(im.static[a_name], im.static[b_name]))
            except TypeError:  # a size fed at run time (shapes.Dim) has no arithmetic
                raise im.fail(
                    f"{node.op_type} on shapes {im.static[a_name]} and {im.static[b_name]}: "
                    "arithmetic on a size fed at run time (the batch) is not supported"
                ) from None
        a = im.vars.get(a_name)
        b = im.var(b_name, like=a)
        return fn(im.var(a_name, like=b), b)

    return convert


def _global_average_pool(im: _Importer, node: Any) -> SymbolVar:
    return opr.mean(im.var(node.input[0]), axis=(2, 3), keepdims=True)


def _gemm(im: _Importer, node: Any) -> SymbolVar:
    a = im.attrs()
    y = opr.matrix_mul(
        im.var(node.input[0]),
        im.var(node.input[1]),
        transpose_a=bool(a.get("transA", 0)),
        transpose_b=bool(a.get("transB", 0)),
    )
    if a.get("alpha", 1.0) != 1.0:
        y = y * float(a["alpha"])
    if len(node.input) > 2 and node.input[2]:
        c = im.var(node.input[2], like=y)
        y = y + (c * float(a["beta"]) if a.get("beta", 1.0) != 1.0 else c)
    return y


def _flatten(im: _Importer, node: Any) -> SymbolVar:
    x = im.var(node.input[0])
    axis = im.attrs().get("axis", 1) % x.ndim if x.ndim else 0
    if axis == 1:
        return opr.flatten(x, 1)
    rest = x.shape[axis:]
    if None in rest:
        raise im.fail(f"Flatten(axis={axis}) needs static sizes after the axis, got {x.shape}")
    return opr.reshape(x, (-1, int(np.prod(rest, dtype=np.int64))))


def _reshape(im: _Importer, node: Any) -> SymbolVar | np.ndarray:
    target = im.constant_input(node.input[1], "the Reshape shape")
    if node.input[0] in im.static:  # shape arithmetic on constants
        return np.reshape(im.static[node.input[0]], [int(d) for d in target])
    x = im.var(node.input[0])
    return opr.reshape(x, shapes.reshape_target(im, x, target, bool(im.attrs().get("allowzero", 0))))


def _transpose(im: _Importer, node: Any) -> SymbolVar | np.ndarray:
    if node.input[0] in im.static:  # PyTorch's Pad computes its pads with Slice/Transpose/Reshape
        return np.transpose(im.static[node.input[0]], im.attrs().get("perm"))
    return opr.transpose(im.var(node.input[0]), im.attrs().get("perm"))


def _softmax(fn: Callable) -> Callable:
    def convert(im: _Importer, node: Any) -> SymbolVar:
        x = im.var(node.input[0])
        default = -1 if im.opset >= 13 else 1
        axis = im.attrs().get("axis", default) % x.ndim
        if im.opset < 13 and axis != x.ndim - 1:
            raise im.fail(
                f"opset {im.opset} {node.op_type} over axes {axis}.. of a {x.ndim}-D input "
                "(coerced to 2-D) is not supported"
            )
        return fn(x, axis)

    return convert


def _batch_norm(im: _Importer, node: Any) -> SymbolVar:
    a = im.attrs()
    if len(node.output) > 1 and any(node.output[1:]):
        raise im.fail("BatchNormalization in training mode (running-stat outputs) is not supported")
    x, scale, bias, mean, var = (im.var(n) for n in node.input[:5])
    for stat in (mean, var):
        if isinstance(stat.op, opr.SharedDeviceTensor):
            stat.op.attrs["trainable"] = False  # statistics are buffers, not weights
    # ONNX's momentum weighs the old running value (0.9); the engine's weighs the batch (0.1).
    return opr.batch_norm(
        x, scale, bias, mean, var, momentum=1.0 - float(a.get("momentum", 0.9)), eps=float(a.get("epsilon", 1e-5))
    )


def _dropout(im: _Importer, node: Any) -> SymbolVar:
    if len(node.output) > 1 and node.output[1]:
        raise im.fail("the mask output of Dropout is not supported")
    ratio = im.attrs().get("ratio", 0.5)
    if len(node.input) > 1 and node.input[1]:
        ratio = float(im.constant_input(node.input[1], "the Dropout ratio"))
    return opr.dropout(im.var(node.input[0]), float(ratio), seed=len(im.graph.nodes))


def _constant(im: _Importer, node: Any) -> np.ndarray:
    a = im.attrs()
    if "value" in a:
        return im.onnx.numpy_helper.to_array(a["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in a:
            return np.asarray(a[key], dtype)
    raise im.fail(f"Constant with attributes {sorted(a)} is not supported")


def _identity(im: _Importer, node: Any) -> SymbolVar | np.ndarray:
    name = node.input[0]
    if name in im.static:
        return im.static[name]
    source = im.var(name)
    if isinstance(source.op, opr.SharedDeviceTensor):
        # PyTorch's exporter shares one initializer between equal tensors (BN weight == running_var at
        # init) through Identity; give the alias its own tensor, so training one does not move the other.
        copy = opr.shared(im.graph, source.value, node.output[0])
        im.params[node.output[0]] = copy
        return copy
    return source


CONVERTERS: dict[str, Callable[[_Importer, Any], SymbolVar | np.ndarray]] = {
    "Conv": spatial.conv,
    "MaxPool": spatial.pool("max"),
    "AveragePool": spatial.pool("average"),
    "Pad": spatial.pad_op,
    "GlobalAveragePool": _global_average_pool,
    "Gemm": _gemm,
    "Add": _binary(lambda a, b: a + b),
    "Sub": _binary(lambda a, b: a - b),
    "Mul": _binary(lambda a, b: a * b),
    "Div": _binary(lambda a, b: a / b),
    "Relu": _unary(opr.relu),
    "Sigmoid": _unary(opr.sigmoid),
    "Tanh": _unary(opr.tanh),
    "Exp": _unary(opr.exp),
    "Log": _unary(opr.log),
    "Sqrt": _unary(opr.sqrt),
    "Neg": _unary(opr.neg),
    "Abs": _unary(opr.abs),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Concat": shapes.concat,
    "Shape": shapes.shape,
    "Unsqueeze": shapes.unsqueeze,
    "Squeeze": shapes.squeeze,
    "Cast": shapes.cast,
    "Slice": shapes.slice_,
    "Softmax": _softmax(opr.softmax),
    "LogSoftmax": _softmax(opr.log_softmax),
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Constant": _constant,
    "Identity": _identity,
    # transformers, mobile CNNs, recurrent networks (modern.py, recurrent.py)
    "MatMul": modern.matmul,
    "LayerNormalization": modern.layer_normalization,
    "Erf": _unary(opr.erf),
    "Pow": _binary(lambda a, b: a**b),
    "Where": modern.where,
    "Expand": modern.expand,
    "ConstantOfShape": modern.constant_of_shape,
    "Split": modern.split,
    "Gather": modern.gather,
    "ReduceMean": modern.reduce("mean"),
    "ReduceSum": modern.reduce("sum"),
    "ReduceMax": modern.reduce("max"),
    "Equal": _binary(lambda a, b: np.equal(a, b).astype(bool) if isinstance(a, np.ndarray) else opr.equal(a, b)),
    "Less": _binary(lambda a, b: np.less(a, b) if isinstance(a, np.ndarray) else opr.less(a, b)),
    "Greater": _binary(lambda a, b: np.greater(a, b) if isinstance(a, np.ndarray) else opr.greater(a, b)),
    "LessOrEqual": _binary(lambda a, b: np.less_equal(a, b) if isinstance(a, np.ndarray) else opr.LessEqual.make(a, b)),
    "GreaterOrEqual": _binary(
        lambda a, b: np.greater_equal(a, b) if isinstance(a, np.ndarray) else opr.GreaterEqual.make(a, b)
    ),
    "Not": modern.logical_not,
    "Mod": modern.static_only("Mod", np.mod),
    "Clip": modern.clip,
    "HardSigmoid": modern.hard_sigmoid,
    "HardSwish": _unary(opr.hard_swish),
    "Resize": modern.resize,
    "GRU": recurrent.gru,
    "LSTM": recurrent.lstm,
}


def import_onnx(source: str | os.PathLike | bytes | Any) -> Model:
    """An ONNX model (path, bytes or ModelProto) as an engine `Model` ready for a loss and an optimizer."""
    onnx = require_onnx()
    try:
        if isinstance(source, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            proto = onnx.load(os.fspath(source), load_external_data=False)
        else:
            proto = source
        onnx.checker.check_model(proto)
    except OnnxError:
        raise
    except Exception as exc:  # onnx raises protobuf DecodeError, ValidationError, OSError...
        raise OnnxError(f"not a valid ONNX model: {exc}") from None
    return _Importer(proto).run()

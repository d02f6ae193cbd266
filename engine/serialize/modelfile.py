"""Model files: the forward graph (operators, attributes, inputs, outputs), its weights and
metadata, in one tensor container of kind "model". The format is documented in docs/model-format.md.

Loading re-adds every node through its operator's shape rule, so a file whose shapes
disagree with its own graph, or that names an unknown operator, is refused with the node
and the reason. Nothing in the file is executed: the graph is JSON, weights are raw arrays,
attributes are checked against a table of their types, and no node may declare a tensor
larger than MAX_ELEMENTS (a hostile file cannot make the engine allocate absurd sizes later).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.preprocessing import METADATA_KEY as PREPROCESSING_KEY
from ..data.preprocessing import Preprocessing
from ..graph import ComputingGraph, GraphError, SymbolVar
from ..model import Model
from ..opr.base import OPERATORS, Operator
from ..opr.io import Host2DeviceCopy, ImmutableTensor, SharedDeviceTensor
from ..opr.nn import ModeSelect
from ..opr.update import AddUpdate
from .container import DTYPES, ContainerError, write_atomic
from .container import dumps as dump_container
from .container import loads as load_container

FORMAT = "pocketfed-model"
FORMAT_VERSION = 1
MAX_NODES = 200_000
MAX_ELEMENTS = 1 << 28  # per tensor (1 GiB of float32): larger static shapes are refused
MAX_INT = 1 << 31  # bound on integer attributes (sizes, axes, seeds)
_CONST_PREFIX = "__const__/"


class ModelFileError(ContainerError):
    """A model file is malformed, hostile, or disagrees with itself."""


# ----- attribute types: every attribute any operator stores, by name -----


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -MAX_INT <= v <= MAX_INT


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and not isinstance(v, bool) and np.isfinite(v)


def _int_list(max_len: int = 8, none_ok: bool = False):
    def check(v: Any) -> bool:
        return isinstance(v, list) and len(v) <= max_len and all(_is_int(d) or (none_ok and d is None) for d in v)

    return check


_PAIR = _int_list(2)
ATTRIBUTES: dict[str, Any] = {
    "shape": _int_list(none_ok=True),
    "dtype": lambda v: isinstance(v, str) and v in DTYPES,
    "trainable": lambda v: isinstance(v, bool),
    "stride": _PAIR,
    "padding": _PAIR,
    "dilation": _PAIR,
    "window": _PAIR,
    "groups": _is_int,
    "mode": lambda v: isinstance(v, str) and len(v) < 64,
    "transpose_a": lambda v: isinstance(v, bool),
    "transpose_b": lambda v: isinstance(v, bool),
    "keep_axes": _int_list(),
    "perm": _int_list(),
    "axes": _int_list(),
    "keepdims": lambda v: isinstance(v, bool),
    "axis": _is_int,
    "start": _is_int,
    "stop": _is_int,
    "num_classes": _is_int,
    "p": _is_number,
    "seed": lambda v: _is_int(v) and v >= 0,
    "alpha": _is_number,
    "beta": _is_number,
    "bias": _is_number,
    "low": lambda v: v is None or _is_number(v),
    "high": lambda v: v is None or _is_number(v),
    "swish": lambda v: isinstance(v, bool),
    "eps": lambda v: _is_number(v) and v > 0,
    "ref_axes": _int_list(none_ok=True),
    "size": _int_list(2),
    "coordinate": lambda v: isinstance(v, str) and len(v) < 64,
    "nearest": lambda v: isinstance(v, str) and len(v) < 64,
}


def _check_attrs(i: int, entry: dict, attrs: dict) -> None:
    for key, value in attrs.items():
        rule = ATTRIBUTES.get(key)
        if rule is None:
            raise _fail(i, entry, f"unknown attribute {key!r}")
        if not rule(value):
            raise _fail(i, entry, f"attribute {key!r} has a bad value or type: {value!r}")


# ----- saving -----


def _resolve(var: SymbolVar, inference_only: bool) -> SymbolVar:
    """In inference-only files a train/eval switch is replaced by its eval branch."""
    while inference_only and isinstance(var.op, ModeSelect):
        var = var.inputs[1]
    return var


def collect_nodes(model: Model, inference_only: bool = False) -> list[SymbolVar]:
    """The nodes a file holds, in creation (topological) order: the outputs' ancestors, plus, for
    training files, the updates attached to them (running statistics). Inference-only files keep
    only the eval branch of each train/eval switch, so dropout and running-stat updates vanish."""
    seen: dict[int, SymbolVar] = {}
    stack = [_resolve(v, inference_only) for v in [*model.outputs.values(), *model.inputs.values()]]
    while stack:
        var = stack.pop()
        if var.id in seen:
            continue
        seen[var.id] = var
        stack.extend(_resolve(i, inference_only) for i in var.inputs)
        if not inference_only:
            stack.extend(var.side_updates)
    return sorted(seen.values(), key=lambda v: v.id)


def graph_digest(graph_ir: dict) -> str:
    """sha256 of the graph section in canonical JSON (the weights are covered by the container's hash)."""
    return hashlib.sha256(json.dumps(graph_ir, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def to_container(model: Model, inference_only: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    nodes = collect_nodes(model, inference_only)
    index = {v.id: i for i, v in enumerate(nodes)}

    def ref(var: SymbolVar) -> int:
        return index[_resolve(var, inference_only).id]

    tensors: dict[str, np.ndarray] = {}
    entries = []
    for i, var in enumerate(nodes):
        entry: dict[str, Any] = {
            "op": var.op.type_name,  # the operator's name in the file
            "attrs": var.op.attrs,
            "inputs": [ref(x) for x in var.inputs],
            "name": var.name,
            "shape": [None if d is None else int(d) for d in var.shape],
            "dtype": var.dtype.name,
        }
        if isinstance(var.op, SharedDeviceTensor):
            tensors[var.name] = var.value
        elif isinstance(var.op, ImmutableTensor):
            tensors[f"{_CONST_PREFIX}{i}"] = np.asarray(var.value)
        ups = [] if inference_only else [index[u.id] for u in var.side_updates if u.id in index]
        if ups:
            entry["side_updates"] = ups
        entries.append(entry)
    names = {n: ref(v) for n, v in model.inputs.items()}
    outs = {n: ref(v) for n, v in model.outputs.items()}
    graph_ir = {"nodes": entries, "inputs": names, "outputs": outs}
    metadata = {
        **model.metadata,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "graph": graph_ir,
        "graph_sha256": graph_digest(graph_ir),
        "inputs": [{"name": n, "shape": entries[i]["shape"], "dtype": entries[i]["dtype"]} for n, i in names.items()],
        "outputs": [{"name": n, "shape": entries[i]["shape"]} for n, i in outs.items()],
        "trainable": [n for n in model.trainable if n in tensors],
        "inference_only": inference_only,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return tensors, metadata


def dumps(model: Model, inference_only: bool = False) -> bytes:
    """Model file bytes; `inference_only` drops the training-only parts (dropout, running-stat updates)."""
    tensors, metadata = to_container(model, inference_only)
    return dump_container(tensors, metadata, kind="model")


def save(model: Model, path: str | os.PathLike, inference_only: bool = False) -> str:
    """Write a model file atomically; returns its sha256 (the content hash)."""
    data = dumps(model, inference_only)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


# ----- loading -----


def _fail(i: int, entry: Any, why: str) -> ModelFileError:
    op = entry.get("op") if isinstance(entry, dict) else "?"
    return ModelFileError(f"model graph node {i} ({op}): {why}")


def _rebuild_node(
    graph: ComputingGraph, i: int, entry: Any, built: list[SymbolVar], tensors: dict[str, np.ndarray]
) -> SymbolVar:
    if not isinstance(entry, dict):
        raise _fail(i, entry, "is not an object")
    op_name, attrs, inputs = entry.get("op"), entry.get("attrs", {}), entry.get("inputs", [])
    cls = OPERATORS.get(op_name) if isinstance(op_name, str) else None
    if cls is None or inspect.isabstract(cls) or op_name.startswith("_"):
        raise _fail(i, entry, f"unknown operator {op_name!r}")
    if not isinstance(attrs, dict) or not isinstance(inputs, list):
        raise _fail(i, entry, "attrs must be an object and inputs a list")
    if not all(_is_int(j) and 0 <= j < i for j in inputs):
        raise _fail(i, entry, f"inputs {inputs} must name earlier nodes")
    _check_attrs(i, entry, attrs)
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(i, entry, "name must be a string")
    if cls.is_source and inputs:
        raise _fail(i, entry, "a source node takes no inputs")
    try:
        if cls is Host2DeviceCopy:
            if any(d is not None and d < 0 for d in attrs["shape"]):
                raise _fail(i, entry, f"input shape {attrs['shape']} has a negative size")
            return Host2DeviceCopy.make(
                graph, [(-1 if d is None else d) for d in attrs["shape"]], attrs["dtype"], name=name or f"input{i}"
            )
        if cls is SharedDeviceTensor:
            if name not in tensors:
                raise _fail(i, entry, f"weight {name!r} is missing from the file")
            trainable = bool(attrs.get("trainable", True))
            return SharedDeviceTensor.make(graph, tensors[name], name, trainable=trainable)
        if cls is ImmutableTensor:
            key = f"{_CONST_PREFIX}{i}"
            if key not in tensors:
                raise _fail(i, entry, "constant value is missing from the file")
            return ImmutableTensor.make(graph, tensors[key])
        if not inputs:
            raise _fail(i, entry, "an operator needs inputs")
        return cls.rebuild([built[j] for j in inputs], attrs, name=name)
    except ModelFileError:
        raise
    except (GraphError, TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError) as exc:
        raise _fail(i, entry, f"cannot be rebuilt: {exc}") from None


def _check_declared(i: int, entry: dict, var: SymbolVar) -> None:
    shape = entry.get("shape")
    declared = None if shape is None else tuple(shape) if isinstance(shape, list) else shape
    if declared is not None and declared != var.shape:
        raise _fail(i, entry, f"the file declares shape {declared} but the graph gives {var.shape}")
    if entry.get("dtype") not in (None, var.dtype.name):
        raise _fail(i, entry, f"the file declares dtype {entry.get('dtype')} but the graph gives {var.dtype}")
    known = [d for d in var.shape if d is not None]
    if any(d > MAX_ELEMENTS for d in known) or int(np.prod(known, dtype=object)) > MAX_ELEMENTS:
        raise _fail(i, entry, f"shape {var.shape} is larger than the limit of {MAX_ELEMENTS} elements")


def from_container(tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> Model:
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"not a pocketfed model file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"model format version {metadata.get('format_version')!r} is not supported "
            f"(this engine reads {FORMAT_VERSION})"
        )
    ir = metadata.get("graph")
    if not isinstance(ir, dict) or not isinstance(ir.get("nodes"), list):
        raise ModelFileError("model file has no graph")
    digest = metadata.get("graph_sha256")
    if digest is not None and digest != graph_digest(ir):
        raise ModelFileError("graph_sha256 does not match the graph: the file was altered or is corrupt")
    entries = ir["nodes"]
    if len(entries) > MAX_NODES:
        raise ModelFileError(f"model graph has {len(entries)} nodes, more than the limit {MAX_NODES}")
    graph = ComputingGraph()
    built: list[SymbolVar] = []
    for i, entry in enumerate(entries):
        var = _rebuild_node(graph, i, entry, built, tensors)
        _check_declared(i, entry, var)
        built.append(var)
    for i, entry in enumerate(entries):
        ups = entry.get("side_updates", [])
        if not isinstance(ups, list):
            raise _fail(i, entry, "side_updates must be a list")
        for j in ups:
            if not (_is_int(j) and 0 <= j < len(built)) or not isinstance(built[j].op, AddUpdate):
                raise _fail(i, entry, f"side update {j!r} is not an update node")
            built[i].side_updates.append(built[j])

    def named(section: str, kind: type[Operator] | None = None) -> dict[str, SymbolVar]:
        table = ir.get(section)
        if not isinstance(table, dict) or not table:
            raise ModelFileError(f"model graph lists no {section}")
        if not all(_is_int(j) and 0 <= j < len(built) for j in table.values()):
            raise ModelFileError(f"model graph {section} refer to nodes that do not exist")
        if kind and not all(isinstance(built[j].op, kind) for j in table.values()):
            raise ModelFileError(f"model graph {section} must refer to {kind.type_name} nodes")
        return {str(n): built[j] for n, j in table.items()}

    params = {v.name: v for v in built if isinstance(v.op, SharedDeviceTensor)}
    extra = {k: v for k, v in metadata.items() if k not in ("graph",)}
    if PREPROCESSING_KEY in extra:
        try:
            Preprocessing.from_metadata(extra[PREPROCESSING_KEY])
        except ValueError as exc:
            raise ModelFileError(str(exc)) from None
    return Model(
        graph, inputs=named("inputs", Host2DeviceCopy), outputs=named("outputs"), params=params, metadata=extra
    )


def loads(data: bytes) -> Model:
    """A Model from model-file bytes; raises ModelFileError/ContainerError naming what is wrong."""
    container = load_container(data, kind="model")
    return from_container(container.tensors, container.metadata)


def load(path: str | os.PathLike) -> Model:
    return loads(Path(path).read_bytes())

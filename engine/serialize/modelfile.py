"""Model files: the forward graph (operators, attributes, inputs, outputs), its weights and
metadata, in one tensor container of kind "model".

Loading re-adds every node through its operator's shape rule, so a file whose shapes
disagree with its own graph, or that names an unknown operator, is refused with the node
and the reason. Nothing in the file is executed: the graph is JSON, weights are raw arrays.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..graph import ComputingGraph, GraphError, SymbolVar, ancestors
from ..model import Model
from ..opr import OPERATORS, Host2DeviceCopy, ImmutableTensor, SharedDeviceTensor
from .container import DTYPES, ContainerError, loads as load_container, dumps as dump_container, write_atomic

FORMAT = "pocketfed-model"
FORMAT_VERSION = 1
MAX_NODES = 200_000
_CONST_PREFIX = "__const__/"


class ModelFileError(ContainerError):
    """A model file is malformed, hostile, or disagrees with itself."""


def _collect(model: Model, inference_only: bool) -> list[SymbolVar]:
    """The nodes to save: the outputs' ancestors, plus (for training) their attached updates."""
    def resolve(var: SymbolVar) -> SymbolVar:
        while inference_only and var.op.type_name == "ModeSelect":
            var = var.inputs[1]
        return var

    roots = [resolve(v) for v in model.outputs.values()] + list(model.inputs.values())
    seen: dict[int, SymbolVar] = {}
    while roots:
        for var in ancestors(roots):
            if inference_only and any(i.op.type_name == "ModeSelect" for i in var.inputs):
                raise GraphError("inference-only save met an unresolved train/eval switch")
            seen[var.id] = var
        roots = [] if inference_only else [u for v in seen.values() for u in v.side_updates if u.id not in seen]
        if inference_only:
            break
    if inference_only:  # re-walk with switches resolved so the training branch is not saved
        seen = {}
        stack = [resolve(v) for v in [*model.outputs.values(), *model.inputs.values()]]
        while stack:
            var = stack.pop()
            if var.id not in seen:
                seen[var.id] = var
                stack.extend(resolve(i) for i in var.inputs)
    return sorted(seen.values(), key=lambda v: v.id)


def to_container(model: Model, inference_only: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    nodes = _collect(model, inference_only)
    index = {v.id: i for i, v in enumerate(nodes)}

    def ref(var: SymbolVar) -> int:
        while inference_only and var.op.type_name == "ModeSelect":
            var = var.inputs[1]
        return index[var.id]

    tensors: dict[str, np.ndarray] = {}
    entries = []
    for i, var in enumerate(nodes):
        entry: dict[str, Any] = {"op": var.op.type_name, "attrs": var.op.attrs, "inputs": [ref(x) for x in var.inputs],
                                 "name": var.name, "shape": [None if d is None else int(d) for d in var.shape],
                                 "dtype": var.dtype.name}
        if var.op.type_name == "SharedDeviceTensor":
            tensors[var.name] = var.value
        elif var.op.type_name == "ImmutableTensor":
            tensors[f"{_CONST_PREFIX}{i}"] = np.asarray(var.value)
        ups = [] if inference_only else [index[u.id] for u in var.side_updates if u.id in index]
        if ups:
            entry["side_updates"] = ups
        entries.append(entry)
    names = {n: ref(v) for n, v in model.inputs.items()}
    outs = {n: ref(v) for n, v in model.outputs.items()}
    metadata = {**model.metadata, "format": FORMAT, "format_version": FORMAT_VERSION,
                "graph": {"nodes": entries, "inputs": names, "outputs": outs},
                "inputs": [{"name": n, "shape": entries[i]["shape"], "dtype": entries[i]["dtype"]} for n, i in names.items()],
                "outputs": [{"name": n, "shape": entries[i]["shape"]} for n, i in outs.items()],
                "trainable": [n for n in model.trainable if n in tensors],
                "inference_only": inference_only,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return tensors, metadata


def dumps(model: Model, inference_only: bool = False) -> bytes:
    tensors, metadata = to_container(model, inference_only)
    return dump_container(tensors, metadata, kind="model")


def save(model: Model, path: str | os.PathLike, inference_only: bool = False) -> str:
    """Write a model file atomically; returns its sha256 (the content hash)."""
    data = dumps(model, inference_only)
    write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def _fail(i: int, entry: Any, why: str) -> ModelFileError:
    op = entry.get("op") if isinstance(entry, dict) else "?"
    return ModelFileError(f"model graph node {i} ({op}): {why}")


def _rebuild_node(graph: ComputingGraph, i: int, entry: Any, built: list[SymbolVar],
                  tensors: dict[str, np.ndarray]) -> SymbolVar:
    if not isinstance(entry, dict):
        raise _fail(i, entry, "is not an object")
    op_name, attrs, inputs = entry.get("op"), entry.get("attrs", {}), entry.get("inputs", [])
    cls = OPERATORS.get(op_name) if isinstance(op_name, str) else None
    if cls is None or inspect.isabstract(cls) or op_name.startswith("_"):
        raise _fail(i, entry, f"unknown operator {op_name!r}")
    if not isinstance(attrs, dict) or not isinstance(inputs, list):
        raise _fail(i, entry, "attrs must be an object and inputs a list")
    if not all(isinstance(j, int) and 0 <= j < i for j in inputs):
        raise _fail(i, entry, f"inputs {inputs} must name earlier nodes")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(i, entry, "name must be a string")
    try:
        if cls is Host2DeviceCopy:
            if entry.get("dtype") not in DTYPES:
                raise _fail(i, entry, f"dtype {entry.get('dtype')!r} is not allowed")
            return Host2DeviceCopy.make(graph, [(-1 if d is None else d) for d in attrs["shape"]],
                                        attrs["dtype"], name=name or f"input{i}")
        if cls is SharedDeviceTensor:
            if name not in tensors:
                raise _fail(i, entry, f"weight {name!r} is missing from the file")
            return SharedDeviceTensor.make(graph, tensors[name], name, trainable=bool(attrs.get("trainable", True)))
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
    except (GraphError, TypeError, KeyError, AttributeError, ValueError, IndexError) as exc:
        raise _fail(i, entry, f"cannot be rebuilt: {exc}") from None


def _check_declared(i: int, entry: dict, var: SymbolVar) -> None:
    shape = entry.get("shape")
    declared = None if shape is None else tuple(shape)
    if declared is not None and declared != var.shape:
        raise _fail(i, entry, f"the file declares shape {declared} but the graph gives {var.shape}")
    if entry.get("dtype") not in (None, var.dtype.name):
        raise _fail(i, entry, f"the file declares dtype {entry.get('dtype')} but the graph gives {var.dtype}")


def from_container(tensors: dict[str, np.ndarray], metadata: dict[str, Any]) -> Model:
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"not a pocketfed model file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"model format version {metadata.get('format_version')!r} is not supported "
                             f"(this engine reads {FORMAT_VERSION})")
    ir = metadata.get("graph")
    if not isinstance(ir, dict) or not isinstance(ir.get("nodes"), list):
        raise ModelFileError("model file has no graph")
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
        for j in entry.get("side_updates", []):
            if not (isinstance(j, int) and 0 <= j < len(built)) or built[j].op.type_name != "AddUpdate":
                raise _fail(i, entry, f"side update {j!r} is not an update node")
            built[i].side_updates.append(built[j])

    def named(section: str) -> dict[str, SymbolVar]:
        table = ir.get(section)
        if not isinstance(table, dict) or not table:
            raise ModelFileError(f"model graph lists no {section}")
        if not all(isinstance(j, int) and 0 <= j < len(built) for j in table.values()):
            raise ModelFileError(f"model graph {section} refer to nodes that do not exist")
        return {str(n): built[j] for n, j in table.items()}

    params = {v.name: v for v in built if v.op.type_name == "SharedDeviceTensor"}
    extra = {k: v for k, v in metadata.items() if k not in ("graph",)}
    return Model(graph, inputs=named("inputs"), outputs=named("outputs"), params=params, metadata=extra)


def loads(data: bytes) -> Model:
    container = load_container(data, kind="model")
    return from_container(container.tensors, container.metadata)


def load(path: str | os.PathLike) -> Model:
    return loads(Path(path).read_bytes())

"""What the coordinator needs to know about a model file — and nothing about its graph.

A model file is a container of kind "model" (engine/serialize/container.py). The server reads
its tensors and a few metadata fields, and publishes a new version by replacing tensors and
the "version"/"created_at" fields; the graph IR travels through untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from engine.serialize.container import Container, ContainerError, dumps, loads

FORMAT = "pocketfed-model"


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    num_parameters: int
    size_bytes: int
    sha256: str
    created_at: str


def parse_model(data: bytes) -> Container:
    """Load model bytes and check the fields the coordinator relies on."""
    container = loads(data, kind="model")
    meta = container.metadata
    if meta.get("format") != FORMAT:
        raise ContainerError(f"metadata.format {meta.get('format')!r} is not {FORMAT!r}")
    trainable = meta.get("trainable")
    if trainable is not None:
        if not isinstance(trainable, list) or not all(isinstance(n, str) for n in trainable):
            raise ContainerError("metadata.trainable must be a list of tensor names")
        missing = sorted(set(trainable) - set(container.tensors))
        if missing:
            raise ContainerError(f"metadata.trainable names tensors the file does not hold: {missing}")
    for name in trainable_names(container):
        if container.tensors[name].dtype != np.float32:
            raise ContainerError(f"trainable tensor {name!r} is {container.tensors[name].dtype}, not float32")
    return container


def trainable_names(container: Container) -> list[str]:
    """The tensors devices train and send deltas for: metadata.trainable, else every float32 tensor."""
    names = container.metadata.get("trainable")
    if names is None:
        names = [n for n, t in container.tensors.items() if t.dtype == np.float32]
    return list(names)


def expected_shapes(container: Container) -> dict[str, tuple[int, ...]]:
    return {name: tuple(container.tensors[name].shape) for name in trainable_names(container)}


def model_info(data: bytes, container: Container) -> ModelInfo:
    return ModelInfo(
        architecture=str(container.metadata.get("architecture", "unknown")),
        num_parameters=int(sum(container.tensors[n].size for n in trainable_names(container))),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=str(container.metadata.get("created_at") or now_iso()),
    )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def with_version(
    container: Container, version: int, tensors: dict[str, np.ndarray] | None = None, **extra_metadata: object
) -> bytes:
    """New model bytes: the same graph and metadata, the given tensors replaced, a new version."""
    new_tensors = dict(container.tensors)
    for name, value in (tensors or {}).items():
        new_tensors[name] = np.asarray(value, dtype=container.tensors[name].dtype)
    metadata = {**container.metadata, **extra_metadata, "version": int(version), "created_at": now_iso()}
    return dumps(new_tensors, metadata, kind="model")


def initial_model_bytes(spec: str, seed: int = 0) -> bytes:
    """The first model: a model file path, or the name of a built-in architecture (engine.models)."""
    path = Path(spec)
    if path.suffix.lower() == ".onnx":
        try:
            from engine import load
            from engine.serialize.modelfile import dumps as model_dumps

            return model_dumps(load(path))
        except ImportError as exc:
            raise ContainerError(f"--model {spec}: ONNX import is unavailable ({exc})") from None
    if path.exists():
        return path.read_bytes()
    if path.suffix or "/" in spec:
        raise ContainerError(f"--model {spec}: no such file")
    try:
        from engine.models import build_model_bytes
    except ImportError as exc:
        raise ContainerError(f"--model {spec}: built-in models are unavailable ({exc})") from None
    return build_model_bytes(spec, seed=seed)

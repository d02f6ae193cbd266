"""The pocketfed tensor container: named arrays plus JSON metadata, in one safe binary file.

Models, weight deltas and checkpoints all travel in this one format, so one reader
(with one set of checks) guards every byte that comes from a device or a disk.
Nothing in a container is ever executed: the header is JSON, the payload raw
little-endian arrays of a whitelisted dtype.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic  b"PFTENSOR"
    offset 8   u32       container format version (1)
    offset 12  u64       header length H in bytes
    offset 20  H bytes   header, UTF-8 JSON:
                           {"kind": str, "metadata": {...},
                            "payload_sha256": hex,
                            "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]}
    offset 20+H          payload: the tensors' bytes; each tensor's "offset" is relative
                         to the payload start

Every declared size is checked against the real length of the data *before*
anything is allocated, so a hostile header cannot make the reader allocate memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"PFTENSOR"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")  # magic, version, header length
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_NDIM = 8
DTYPES = {  # name in the file -> numpy dtype (always little-endian)
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("?"),
}


class ContainerError(ValueError):
    """A container is malformed, truncated, hostile or of the wrong kind."""


@dataclass
class Container:
    kind: str
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _dtype_name(array: np.ndarray) -> str:
    for name, dtype in DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            return name
    raise ContainerError(f"dtype {array.dtype} cannot be stored; allowed: {', '.join(DTYPES)}")


def dumps(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, Any] | None = None, kind: str = "tensors") -> bytes:
    """Serialize named arrays and JSON-able metadata into container bytes."""
    entries, chunks, offset = [], [], 0
    for name, value in tensors.items():
        array = np.asarray(value)
        dtype_name = _dtype_name(array)
        raw = memoryview(np.ascontiguousarray(array, dtype=DTYPES[dtype_name]).reshape(-1)).cast("B")  # no copy
        entries.append(
            {"name": str(name), "dtype": dtype_name, "shape": list(array.shape), "offset": offset, "nbytes": len(raw)}
        )
        chunks.append(raw)
        offset += len(raw)
    payload = b"".join(chunks)
    header = {
        "kind": kind,
        "metadata": dict(metadata or {}),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": entries,
    }
    header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + payload


def _check_entry(entry: Any, payload_len: int, seen: set[str]) -> tuple[str, np.dtype, tuple[int, ...], int]:
    if not isinstance(entry, dict):
        raise ContainerError("tensor entry is not an object")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ContainerError("tensor entry has no name")
    if name in seen:
        raise ContainerError(f"tensor {name!r} appears twice")
    seen.add(name)
    dtype = DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ContainerError(f"tensor {name!r}: dtype {entry.get('dtype')!r} is not allowed")
    shape = entry.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ContainerError(f"tensor {name!r}: shape {shape!r} is not a list of <= {MAX_NDIM} sizes")
    offset, nbytes = entry.get("offset"), entry.get("nbytes")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, nbytes)):
        raise ContainerError(f"tensor {name!r}: offset/nbytes must be non-negative integers")
    expected = dtype.itemsize * int(np.prod(shape, dtype=object)) if shape else dtype.itemsize
    if expected != nbytes:
        raise ContainerError(
            f"tensor {name!r}: shape {shape} of {entry['dtype']} needs {expected} bytes, header says {nbytes}"
        )
    if offset + nbytes > payload_len:
        raise ContainerError(
            f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie past the payload "
            f"({payload_len} bytes); the file is truncated or lies"
        )
    return name, dtype, tuple(shape), offset


def loads(
    data: bytes | bytearray | memoryview, *, kind: str | None = None, max_header_bytes: int = MAX_HEADER_BYTES
) -> Container:
    """Parse container bytes, checking every declared size before allocating anything (the JSON
    header's length against `max_header_bytes` before it is parsed)."""
    data = memoryview(data)
    if len(data) < _PREFIX.size:
        raise ContainerError(f"{len(data)} bytes is too short to be a pocketfed container")
    magic, version, header_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise ContainerError(f"wrong magic {bytes(magic)!r}: not a pocketfed container (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ContainerError(f"container format version {version} is not supported (this reader: {FORMAT_VERSION})")
    if header_len > max_header_bytes:
        raise ContainerError(f"header length {header_len} exceeds the limit of {max_header_bytes} bytes")
    if _PREFIX.size + header_len > len(data):
        raise ContainerError(f"header length {header_len} exceeds the data ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, 5000-digit integers, absurd nesting
        raise ContainerError(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise ContainerError("header must be an object with a 'tensors' list")
    file_kind = header.get("kind")
    if kind is not None and file_kind != kind:
        raise ContainerError(f"expected a {kind!r} container, got {file_kind!r}")
    metadata = header.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ContainerError("metadata must be an object")
    payload = data[_PREFIX.size + header_len :]
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise ContainerError("payload checksum mismatch: the data is corrupt or truncated")
    seen: set[str] = set()
    checked = [_check_entry(e, len(payload), seen) for e in header["tensors"]]
    tensors = {}
    for name, dtype, shape, offset in checked:
        count = int(np.prod(shape)) if shape else 1
        tensors[name] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
    return Container(kind=str(file_kind), metadata=metadata, tensors=tensors)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any] | None = None,
    kind: str = "tensors",
) -> None:
    write_atomic(path, dumps(tensors, metadata, kind))


def load(path: str | os.PathLike, *, kind: str | None = None) -> Container:
    return loads(Path(path).read_bytes(), kind=kind)

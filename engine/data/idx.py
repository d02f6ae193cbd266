"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic (two zero bytes, a dtype code, the number of
dimensions), one big-endian u32 per dimension, then the raw values. We only
need unsigned bytes: magic 0x00000803 for (N, rows, cols) images and
0x00000801 for (N,) labels. Every size is checked against the real byte
length before the array is built, so a truncated download fails loudly
instead of training on garbage.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_UBYTE_CODE = 0x08
MAX_NDIM = 4


class DataError(ValueError):
    """A data file or directory is missing, malformed or inconsistent."""


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when the name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as exc:  # gzip's BadGzipFile is an OSError; a cut .gz raises EOFError
        raise DataError(f"{path}: cannot read ({exc})") from None


def parse_idx(raw: bytes, name: str = "<bytes>", expected_ndim: int | None = None) -> np.ndarray:
    """Decode IDX bytes into a uint8 array; `name` is used in error messages."""
    if len(raw) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(raw)} bytes)")
    magic = struct.unpack(">I", raw[:4])[0]
    zeros, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zeros != 0 or code != _UBYTE_CODE or not 1 <= ndim <= MAX_NDIM:
        raise DataError(
            f"{name}: wrong magic 0x{magic:08x}; expected 0x{LABELS_MAGIC:08x} (labels) "
            f"or 0x{IMAGES_MAGIC:08x} (images)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        kind = "images" if expected_ndim == 3 else "labels"
        raise DataError(f"{name}: has {ndim} dimensions (magic 0x{magic:08x}), expected {expected_ndim} for {kind}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{name}: truncated header, {len(raw)} bytes but {header_len} needed for {ndim} dims")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = header_len + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{name}: {problem}: dims {tuple(dims)} need {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read a raw or gzipped IDX file of unsigned bytes."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path), expected_ndim)


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes for a uint8 array of 1 to 4 dimensions."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise DataError(f"IDX writer only stores uint8, got {array.dtype}")
    if not 1 <= array.ndim <= MAX_NDIM:
        raise DataError(f"IDX writer needs 1 to {MAX_NDIM} dimensions, got {array.ndim}")
    header = struct.pack(">I", (_UBYTE_CODE << 8) | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, compresslevel: int = 9) -> None:
    """Write `array` as IDX, gzipped when the name ends in .gz (mtime 0: reproducible bytes)."""
    path = Path(path)
    raw = encode_idx(array)
    if path.suffix == ".gz":
        with (
            open(path, "wb") as f,
            gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=compresslevel, mtime=0) as gz,
        ):
            gz.write(raw)
    else:
        path.write_bytes(raw)

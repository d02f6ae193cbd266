"""The update wire format: one device's weight delta, as it travels to the coordinator.

An update is a container (see container.py) of kind "update". It holds the delta of
each trainable tensor (trained minus base) in one of four value encodings, optionally
sparsified to its top-k entries, plus the few numbers the server needs to weigh it:

    metadata = {"format": "pocketfed-update", "format_version": 1,
                "encoding": "float32" | "float16" | "int8" | "int4" | "int4-bitmap", "sparse": bool,
                "sample_count": int > 0, "round_id": int, "base_version": int,
                "metrics": {name: finite float},
                "tensors": {name: {"shape": [...], "encoding": "float32"|"float16"|"int8"|"int4"|"sparse"|"bitmap",
                                   "values"?: value encoding (sparse only), "scale"?: float (int8, int4)}}}

Dense tensors are stored under their own name. A sparse tensor is stored as
"<name>/indices" (int32 flat indices into the dense tensor) and "<name>/values".
int8 is symmetric per tensor: q = round(x / scale), scale = max|x| / 127, so every
decoded element is within scale / 2 of the original. int4 (added in the same format version:
readers without it reject it by name) is symmetric per tensor with stochastic rounding, levels
-7..7, scale = max|x| / 7, stored as nibbles level + 8, two per byte, low nibble first, in a 1-D
uint8 tensor of ceil(n / 2) bytes (n: the tensor's or the sparse part's element count); every
decoded element is within one scale of the original and equal to it in expectation.

"int4-bitmap" (also format version 1; older readers reject it by name) is int4 whose sparse
tensors say which entries they keep with a bitmap instead of int32 indices: encoding "bitmap",
"<name>/mask" is ceil(n / 8) uint8 bytes, entry i at bit i % 8 (least significant first) of byte
i // 8, padding bits zero, and "<name>/values" the kept entries in ascending index order. One bit
per entry instead of 32 per kept entry lets top-k keep half a tensor within 1/8 of float32's bytes.
A tensor keeping fewer than 1/32 of its entries is cheaper as int32 indices and is written that
way ("sparse"); without top-k, int4-bitmap tensors are plain dense int4.

The decoder trusts nothing: every field is checked, and every problem raises
UpdateError with a message naming the field or tensor and why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from engine.serialize.container import ContainerError, dumps, loads
from protocol.deltas import (
    pack_int4,
    pack_mask,
    quantize_int4,
    quantize_int8,
    topk_count,
    topk_indices,
    unpack_int4,
    unpack_mask,
)

FORMAT = "pocketfed-update"
FORMAT_VERSION = 1
VALUE_ENCODINGS = ("float32", "float16", "int8", "int4")
QUANTIZED = ("int8", "int4")  # the encodings with a per-tensor "scale"
BITMAP_VALUES = {"int4-bitmap": "int4"}  # update encodings whose sparse positions are bitmaps -> their values
ENCODINGS = VALUE_ENCODINGS + tuple(BITMAP_VALUES)  # what an update's top-level "encoding" may be
MAX_HEADER_BYTES = 1 << 20  # an update's JSON header: names, shapes, a few metrics (a LeNet's is ~2 KiB)
MAX_METRICS, MAX_METRIC_NAME = 64, 64  # metric names and values are stored and shown: a few short ones
MAX_ELEMENTS = 1 << 27  # 134M elements (512 MiB of float32): far above any on-device model
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class UpdateError(ContainerError):
    """An update is malformed, hostile, or does not fit the model it claims to update."""


@dataclass
class Update:
    delta: dict[str, np.ndarray]  # dense float32, decoded
    sample_count: int
    round_id: int
    base_version: int
    metrics: dict[str, float] = field(default_factory=dict)
    encoding: str = "float32"
    sparse: bool = False


# ---------------------------------------------------------------- encoding


def _encode_values(
    name: str, values: np.ndarray, encoding: str, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, dict]:
    if encoding == "float32":
        return values.astype(np.float32), {}
    if encoding == "float16":
        if values.size and float(np.max(np.abs(values))) > _FLOAT16_MAX:
            raise UpdateError(
                f"tensor {name!r}: values exceed the float16 range ({_FLOAT16_MAX}); clip the delta or use float32"
            )
        return values.astype(np.float16), {}
    if encoding == "int4":
        q, scale = quantize_int4(values, rng if rng is not None else np.random.default_rng())
        return pack_int4(q), {"scale": scale}
    q, scale = quantize_int8(values)
    return q, {"scale": scale}


def encode_update(
    delta: Mapping[str, np.ndarray],
    *,
    sample_count: int,
    round_id: int,
    base_version: int,
    metrics: Mapping[str, float] | None = None,
    encoding: str = "float32",
    topk_fraction: float | None = None,
    rng: np.random.Generator | None = None,
) -> bytes:
    """Encode a weight delta (name -> array) as update-container bytes.

    `rng` drives int4's stochastic rounding (default: fresh OS entropy; seed it for repeatable runs)."""
    if encoding not in ENCODINGS:
        raise UpdateError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    values_as = BITMAP_VALUES.get(encoding, encoding)
    if topk_fraction is not None and not (0.0 < float(topk_fraction) <= 1.0):
        raise UpdateError(f"topk_fraction {topk_fraction!r} must be in (0, 1]")
    _check_int("sample_count", sample_count, minimum=1)
    _check_int("round_id", round_id, minimum=0)
    _check_int("base_version", base_version, minimum=0)
    clean_metrics = _check_metrics(dict(metrics or {}))

    tensors: dict[str, np.ndarray] = {}
    described: dict[str, dict] = {}
    for name, value in delta.items():
        if "/" in name and topk_fraction is not None:
            raise UpdateError(f"tensor {name!r}: names with '/' cannot be sparse-encoded")
        array = np.asarray(value, dtype=np.float32)
        if not np.all(np.isfinite(array)):
            raise UpdateError(f"tensor {name!r}: contains NaN or Inf; refusing to send it")
        if topk_fraction is None:
            stored, extra = _encode_values(name, array, values_as, rng)
            tensors[name] = stored
            described[name] = {"shape": list(array.shape), "encoding": values_as, **extra}
        else:
            flat = array.reshape(-1)
            indices = topk_indices(flat, topk_count(flat.size, float(topk_fraction)))
            stored, extra = _encode_values(name, flat[indices], values_as, rng)
            tensors[f"{name}/values"] = stored
            if encoding in BITMAP_VALUES and 32 * len(indices) >= flat.size:
                tensors[f"{name}/mask"] = pack_mask(indices, flat.size)
                layout = "bitmap"
            else:
                tensors[f"{name}/indices"] = indices
                layout = "sparse"
            described[name] = {"shape": list(array.shape), "encoding": layout, "values": values_as, **extra}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "encoding": encoding,
        "sparse": topk_fraction is not None,
        "sample_count": int(sample_count),
        "round_id": int(round_id),
        "base_version": int(base_version),
        "metrics": clean_metrics,
        "tensors": described,
    }
    return dumps(tensors, metadata, kind="update")


# ---------------------------------------------------------------- decoding


def _check_int(field_name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UpdateError(f"{field_name} must be an integer, got {value!r}")
    if value < minimum:
        raise UpdateError(f"{field_name} must be >= {minimum}, got {value}")
    return int(value)


def _check_metrics(metrics: object) -> dict[str, float]:
    if not isinstance(metrics, dict):
        raise UpdateError("metrics must be an object of name -> number")
    if len(metrics) > MAX_METRICS:
        raise UpdateError(f"metrics: {len(metrics)} entries, more than the limit of {MAX_METRICS}")
    clean = {}
    for key, value in metrics.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
        ):
            raise UpdateError(f"metric {str(key)[:80]!r} must be a number, got {str(value)[:80]}")
        if not key or len(key) > MAX_METRIC_NAME:
            raise UpdateError(f"metric name {key[:80]!r}: must be 1 to {MAX_METRIC_NAME} characters")
        if not math.isfinite(float(value)):
            raise UpdateError(f"metric {key!r} is not finite ({value})")
        clean[key] = float(value)
    return clean


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise UpdateError(f"tensor {name!r}: shape {shape!r} is not a list of <= 8 non-negative sizes")
    if math.prod(shape) > MAX_ELEMENTS:
        raise UpdateError(
            f"tensor {name!r}: shape {shape} declares {math.prod(shape)} elements, more than the limit {MAX_ELEMENTS}"
        )
    return tuple(shape)


def _stored_shape(encoding: object, count_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored array's shape for `count_shape` elements: packed int4 is 1-D, ceil(n / 2) bytes."""
    return ((math.prod(count_shape) + 1) // 2,) if encoding == "int4" else count_shape


def _decode_values(name: str, stored: np.ndarray, encoding: object, spec: dict, count: int) -> np.ndarray:
    """`count` float32 values from their stored form (1-D for int4, the stored shape otherwise)."""
    if encoding not in VALUE_ENCODINGS:
        raise UpdateError(f"tensor {name!r}: encoding {encoding!r} is not one of {', '.join(VALUE_ENCODINGS)}")
    dtype = np.dtype(np.uint8 if encoding == "int4" else encoding)
    if stored.dtype != dtype:
        raise UpdateError(f"tensor {name!r}: stored as {stored.dtype}, but its encoding {encoding} needs {dtype}")
    if encoding in QUANTIZED:
        scale = spec.get("scale")
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not number or not math.isfinite(scale) or scale < 0:
            raise UpdateError(f"tensor {name!r}: {encoding} scale {scale!r} must be a finite number >= 0")
        if encoding == "int4":
            try:
                return unpack_int4(stored, count).astype(np.float32) * np.float32(scale)
            except ValueError as exc:
                raise UpdateError(f"tensor {name!r}: {exc}") from None
        return stored.astype(np.float32) * np.float32(scale)
    values = stored.astype(np.float32, copy=False)  # loads() made it: no second copy of a float32 tensor
    if not np.all(np.isfinite(values)):
        raise UpdateError(f"tensor {name!r}: contains NaN or Inf")
    return values


def _decode_tensor(
    name: str, spec: object, stored: dict[str, np.ndarray], used: set[str], update_encoding: str
) -> np.ndarray:
    if not isinstance(spec, dict):
        raise UpdateError(f"tensor {name!r}: its description is not an object")
    shape = _check_shape(name, spec.get("shape"))
    encoding = spec.get("encoding")
    if encoding == "bitmap" and update_encoding not in BITMAP_VALUES:
        raise UpdateError(f"tensor {name!r}: bitmap positions need a bitmap update encoding, not {update_encoding!r}")
    if encoding not in ("sparse", "bitmap"):
        if name not in stored:
            raise UpdateError(f"tensor {name!r}: described but its data is missing")
        used.add(name)
        if stored[name].shape != _stored_shape(encoding, shape):
            raise UpdateError(
                f"tensor {name!r}: data has shape {list(stored[name].shape)}, description says {list(shape)}"
                + (" (packed int4: ceil(n / 2) bytes, 1-D)" if encoding == "int4" else "")
            )
        return _decode_values(name, stored[name], encoding, spec, math.prod(shape)).reshape(shape)
    idx_name = f"{name}/mask" if encoding == "bitmap" else f"{name}/indices"
    val_name = f"{name}/values"
    for part in (idx_name, val_name):
        if part not in stored:
            raise UpdateError(f"tensor {name!r}: sparse part {part!r} is missing")
        if stored[part].ndim != 1:
            raise UpdateError(f"tensor {name!r}: sparse part {part!r} must be 1-D")
        used.add(part)
    size = math.prod(shape)
    indices = (_mask_indices if encoding == "bitmap" else _checked_indices)(name, stored[idx_name], size)
    raw_values = stored[val_name]
    if raw_values.shape != _stored_shape(spec.get("values"), (len(indices),)):
        raise UpdateError(f"tensor {name!r}: {len(indices)} indices but {len(raw_values)} stored values")
    values = _decode_values(name, raw_values, spec.get("values"), spec, len(indices))
    dense = np.zeros(size, np.float32)
    dense[indices] = values
    return dense.reshape(shape)


def _checked_indices(name: str, indices: np.ndarray, size: int) -> np.ndarray:
    if indices.dtype != np.int32:
        raise UpdateError(f"tensor {name!r}: indices must be int32, got {indices.dtype}")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise UpdateError(
            f"tensor {name!r}: index out of range [0, {size}) (min {int(indices.min())}, max {int(indices.max())})"
        )
    if len(np.unique(indices)) != len(indices):
        raise UpdateError(f"tensor {name!r}: duplicate sparse indices")
    return indices


def _mask_indices(name: str, mask: np.ndarray, size: int) -> np.ndarray:
    try:
        return unpack_mask(mask, size)
    except ValueError as exc:
        raise UpdateError(f"tensor {name!r}: {exc}") from None


def decode_update(
    data: bytes, *, expected: Mapping[str, tuple[int, ...]] | None = None, max_header_bytes: int = MAX_HEADER_BYTES
) -> Update:
    """Parse and validate update bytes; with `expected` (name -> shape) also check it fits the model.
    The JSON header is refused by its declared length above `max_header_bytes`, before parsing."""
    container = loads(data, kind="update", max_header_bytes=max_header_bytes)  # truncation, kind, sizes
    meta = container.metadata
    if meta.get("format") != FORMAT:
        raise UpdateError(f"format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UpdateError(
            f"format_version {meta.get('format_version')!r} is not supported (this reader: {FORMAT_VERSION})"
        )
    encoding = meta.get("encoding")
    if encoding not in ENCODINGS:
        raise UpdateError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    sample_count = _check_int("sample_count", meta.get("sample_count"), minimum=1)
    round_id = _check_int("round_id", meta.get("round_id"), minimum=0)
    base_version = _check_int("base_version", meta.get("base_version"), minimum=0)
    metrics = _check_metrics(meta.get("metrics", {}))
    described = meta.get("tensors")
    if not isinstance(described, dict) or not described:
        raise UpdateError("tensors must be a non-empty object of name -> description")
    if expected is not None:
        missing = sorted(set(expected) - set(described))
        unknown = sorted(set(described) - set(expected))
        if missing or unknown:
            raise UpdateError(f"tensor names do not match the model: missing {missing}, unknown {unknown}")
    total = sum(
        math.prod(s.get("shape"))
        for s in described.values()
        if isinstance(s, dict) and isinstance(s.get("shape"), list) and all(isinstance(d, int) for d in s["shape"])
    )
    if total > MAX_ELEMENTS:
        raise UpdateError(f"tensors declare {total} elements in all, more than the limit {MAX_ELEMENTS}")

    used: set[str] = set()
    delta = {}
    for name, spec in described.items():
        if expected is not None and isinstance(spec, dict) and spec.get("shape") != list(expected[name]):
            raise UpdateError(
                f"tensor {name!r}: shape {spec.get('shape')!r} does not match the model's {list(expected[name])}"
            )
        delta[name] = _decode_tensor(name, spec, container.tensors, used, encoding)
    extra = sorted(set(container.tensors) - used)
    if extra:
        raise UpdateError(f"stored tensors not described in metadata: {extra}")
    return Update(
        delta=delta,
        sample_count=sample_count,
        round_id=round_id,
        base_version=base_version,
        metrics=metrics,
        encoding=encoding,
        sparse=bool(meta.get("sparse", False)),
    )

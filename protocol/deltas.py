"""The one home of the math a delta goes through: norm, clip, noise, top-k, quantization.

Pure numpy over `dict[str, np.ndarray]` deltas. The device agent uses it before a delta leaves the
phone; the coordinator uses the same functions to check and bound what arrives, so both sides
agree on every number by construction.

- `global_l2_norm`: the norm over all tensors at once (what clipping, DP and validation mean by "norm").
- `clip_by_l2`: scale the whole delta so its global norm is at most a bound (bounds any one
  device's influence; the first half of DP-FedAvg).
- `add_gaussian_noise`: N(0, std^2) on every element (the second half).
- `TopK`: keep each tensor's largest-magnitude fraction and carry the rest to the next round
  (error feedback), so nothing is lost, only delayed.
- `quantize_int8`: symmetric per-tensor int8.
- `quantize_int4`: symmetric per-tensor 4-bit levels -7..7 with stochastic rounding (unbiased:
  E[q * scale] = x), packed two to a byte by `pack_int4`: the update format's smallest value encoding.
- `pack_mask` / `unpack_mask`: which entries a sparse tensor keeps, one bit each (1/32 of int32
  indices' bytes), so top-k can keep a large fraction and still be small.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Delta = dict[str, np.ndarray]


def global_l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """sqrt(sum of squares over every tensor), accumulated in float64."""
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))


def clip_by_l2(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[Delta, float]:
    """(delta scaled to global norm <= max_norm, as float32; the norm before clipping).

    Tensors already within the bound are returned as float32 views of the input, not copies."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_l2_norm(delta)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    if factor >= 1.0:
        return {k: np.asarray(v, np.float32) for k, v in delta.items()}, norm
    return {k: np.asarray(v, np.float32) * np.float32(factor) for k, v in delta.items()}, norm


def add_gaussian_noise(delta: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Delta:
    """delta + N(0, std^2) elementwise (a new dict; the input is not modified)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std!r}")
    return {
        k: (np.asarray(v, np.float32) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32)
        for k, v in delta.items()
    }


def topk_count(size: int, fraction: float) -> int:
    """How many entries a tensor of `size` keeps under top-k: at least one, at most all."""
    return 0 if size == 0 else min(size, max(1, math.ceil(fraction * size)))


def topk_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the k largest-magnitude entries, sorted ascending (stable wire order)."""
    if k >= flat.size:
        return np.arange(flat.size, dtype=np.int32)
    part = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
    return np.sort(part).astype(np.int32)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int8: returns (q, scale) with |x - q * scale| <= scale / 2."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = peak / 127.0
    if scale == 0.0:
        return np.zeros(x.shape, np.int8), 0.0
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale


INT4_LEVELS = 7  # levels -7..7; the nibble 0 (level -8) is never produced and rejected when read


def quantize_int4(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Stochastic symmetric 4-bit: (q int8 in -7..7, scale) with E[q * scale] = x and |x - q * scale| < scale.

    Rounding up with probability equal to the fractional part keeps the quantization unbiased, so
    averaging many devices' updates cancels the error instead of accumulating it (QSGD, Alistarh et al. 2017)."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    scale = peak / INT4_LEVELS
    if scale == 0.0:
        return np.zeros(x.shape, np.int8), 0.0
    scaled = np.asarray(x, np.float64) / scale
    low = np.floor(scaled)
    q = low + (rng.random(scaled.shape) < (scaled - low))
    return np.clip(q, -INT4_LEVELS, INT4_LEVELS).astype(np.int8), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Levels -7..7 as nibbles (level + 8), two per byte, the first element in the low nibble."""
    flat = (q.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(8))  # a zero level pads an odd count
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """The first `count` levels (int8) of a packed buffer; ValueError for the never-written nibble 0."""
    nibbles = np.empty(packed.size * 2, np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    levels = nibbles[:count].astype(np.int8) - 8
    if levels.size and int(levels.min()) < -INT4_LEVELS:
        raise ValueError(f"int4 level {int(levels.min())} is outside -{INT4_LEVELS}..{INT4_LEVELS}")
    return levels


def pack_mask(indices: np.ndarray, size: int) -> np.ndarray:
    """Flat `indices` into a `size`-entry tensor as a bitmap: ceil(size / 8) bytes, entry i at bit
    i % 8 (least significant first) of byte i // 8; the padding bits of the last byte are zero."""
    bits = np.zeros(size, np.uint8)
    bits[indices] = 1
    return np.packbits(bits, bitorder="little")


def unpack_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The ascending flat indices a bitmap marks; ValueError for a wrong length or a set padding bit."""
    need = (size + 7) // 8
    if mask.dtype != np.uint8 or mask.shape != (need,):
        raise ValueError(f"bitmap must be {need} uint8 bytes for {size} entries, got {mask.dtype} {mask.shape}")
    bits = np.unpackbits(mask, bitorder="little")
    if bits[size:].any():
        raise ValueError(f"bitmap marks entries past the tensor's {size}")
    return np.flatnonzero(bits[:size])


class TopK:
    """Top-k sparsification with error feedback (Stich et al. 2018; Lin et al. 2018, "Deep Gradient
    Compression"): each round sends the largest entries of (delta + residual) and keeps the rest."""

    def __init__(self, fraction: float):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def compress(
        self, delta: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None = None
    ) -> tuple[Delta, Delta]:
        """Return (sparse delta, dense with zeros; new residual), where sparse + new == delta + old."""
        residual = residual or {}
        sparse, new_residual = {}, {}
        for name, value in delta.items():
            carried = residual.get(name)
            if carried is not None and np.shape(carried) != np.shape(value):
                carried = None  # the model changed shape: an old residual no longer applies
            total = np.asarray(value, np.float32) + (carried if carried is not None else 0.0)
            flat = total.reshape(-1)
            keep = topk_indices(flat, topk_count(flat.size, self.fraction))
            sent = np.zeros_like(flat)
            sent[keep] = flat[keep]
            sparse[name] = sent.reshape(total.shape)
            new_residual[name] = (flat - sent).reshape(total.shape)
        return sparse, new_residual

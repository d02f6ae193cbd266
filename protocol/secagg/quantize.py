"""Fixed point in Z_(2^32): how a float delta becomes a vector the masks can hide, and back.

Masks are uniform in Z_(2^32), so the input must be integers modulo 2^32 whose *sum* over the
cohort still decodes. A device with w samples (capped at `max_weight` W) sends::

    [w, q((w / W) * x_1), ..., q((w / W) * x_d)]      x clipped elementwise to [-c, c]

where q(y) = round(y * S), S = levels / (2c), stored in two's complement mod 2^32. The server
gets sum(w) exactly and sum(q) ~ S * sum((w/W) x), so the weighted FedAvg mean is
W * sum(q) / (S * sum(w)). Scaling by w / W <= 1 keeps every entry inside [-c, c]: one device's
entry is at most levels / 2 in magnitude.

Overflow: a sum of n entries decodes correctly iff it lies in [-2^31, 2^31 - 1]. With every entry
in [-levels/2, levels/2] this holds for n * levels / 2 <= 2^31 - 1 (plus the DP noise margin,
see `noise.overflow_margin`). With Flower's defaults (c = 8, levels = 2^22) that is n <= 1023
devices. `SecAggConfig` asserts it when built.

Rounding is stochastic (floor(y) + Bernoulli(frac y): unbiased, error < 1 step) or deterministic
(nearest, error <= 1/2 step). Since the weight is exact, the mean's error per coordinate is at
most W * n * e / (S * sum(w)), e = 1 or 1/2 (`Quantizer.mean_error_bound`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocol.secagg.wire import SecAggError

FIELD_BITS = 32
FIELD_DTYPE = np.dtype("<u4")
SIGNED_LIMIT = 2 ** (FIELD_BITS - 1) - 1  # the largest sum that still decodes as positive
ROUNDINGS = ("stochastic", "deterministic")


def flatten(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """The delta as one float64 vector, tensors in sorted-name order (what both sides agree on)."""
    if not delta:
        return np.zeros(0, np.float64)
    return np.concatenate([np.asarray(delta[name], np.float64).reshape(-1) for name in sorted(delta)])


def unflatten(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Inverse of `flatten` for tensors of the given shapes (float32)."""
    sizes = {name: math.prod(shapes[name]) for name in sorted(shapes)}
    if sum(sizes.values()) != vector.size:
        raise SecAggError(f"vector of {vector.size} values does not fit tensors of {sum(sizes.values())} values")
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = np.asarray(vector[start : start + size], np.float32).reshape(shapes[name])
        start += size
    return out


def to_field(values: np.ndarray) -> np.ndarray:
    """Signed integers -> uint32 two's complement (wraps modulo 2^32)."""
    return np.asarray(values, np.int64).astype(np.uint32)


def from_field(values: np.ndarray) -> np.ndarray:
    """uint32 -> signed int64 in [-2^31, 2^31 - 1]."""
    return np.asarray(values, np.uint32).view(np.int32).astype(np.int64)


@dataclass(frozen=True)
class Quantizer:
    clipping_range: float = 8.0  # c: each (weighted) value is clipped to [-c, c]
    levels: int = 2**22  # integer steps across [-c, c]
    max_weight: int = 1000  # W: sample counts are capped here before masking
    rounding: str = "stochastic"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clipping_range) and self.clipping_range > 0):
            raise SecAggError(f"clipping_range must be a positive number, got {self.clipping_range!r}")
        if not (isinstance(self.levels, int) and 2 <= self.levels <= 2**FIELD_BITS and self.levels % 2 == 0):
            raise SecAggError(f"quantization levels must be an even integer in [2, 2^32], got {self.levels!r}")
        if not (isinstance(self.max_weight, int) and 1 <= self.max_weight <= 2**20):
            raise SecAggError(f"max_weight must be an integer in [1, 2^20], got {self.max_weight!r}")
        if self.rounding not in ROUNDINGS:
            raise SecAggError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def scale(self) -> float:
        """S: integer steps per unit value."""
        return self.levels / (2.0 * self.clipping_range)

    @property
    def entry_bound(self) -> int:
        """The largest |entry| one device can send (before DP noise)."""
        return self.levels // 2

    def max_cohort(self, noise_margin: float = 0.0) -> int:
        """The most devices whose summed entries cannot overflow the signed range (see module doc)."""
        return int((SIGNED_LIMIT - noise_margin) // self.entry_bound)

    def cap_weight(self, sample_count: int) -> int:
        if isinstance(sample_count, bool) or not isinstance(sample_count, int) or sample_count < 1:
            raise SecAggError(f"sample_count must be a positive integer, got {sample_count!r}")
        return min(sample_count, self.max_weight)

    def encode(self, values: np.ndarray, sample_count: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """(int64 vector [w, q((w/W) x)], w): the device's input before noise and masks."""
        weight = self.cap_weight(sample_count)
        x = np.asarray(values, np.float64).reshape(-1)
        if not np.all(np.isfinite(x)):
            raise SecAggError("the delta holds NaN or infinite values")
        c = self.clipping_range
        y = np.clip(x * (weight / self.max_weight), -c, c) * self.scale
        if self.rounding == "stochastic":
            low = np.floor(y)
            q = low + (rng.random(y.shape) < (y - low))
        else:
            q = np.rint(y)
        bound = self.entry_bound
        out = np.empty(x.size + 1, np.int64)
        out[0] = weight
        out[1:] = np.clip(q, -bound, bound)
        return out, weight

    def decode(self, field_sum: np.ndarray) -> tuple[int, np.ndarray]:
        """(sum of weights, estimate of sum(w_i x_i)) from the unmasked sum of the inputs."""
        signed = from_field(field_sum)
        total_weight = int(signed[0])
        return total_weight, signed[1:].astype(np.float64) * (self.max_weight / self.scale)

    def mean_error_bound(self, devices: int, total_weight: int) -> float:
        """Largest |decoded mean - true weighted mean| per coordinate (no noise, no clipping)."""
        step_error = 1.0 if self.rounding == "stochastic" else 0.5
        return self.max_weight * devices * step_error / (self.scale * total_weight)

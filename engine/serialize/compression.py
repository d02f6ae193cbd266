"""What a device does to its delta before it leaves: clip, add noise, sparsify.

Pure numpy helpers over `dict[str, np.ndarray]` deltas, used by the device agent:

- `clip_by_l2`: scale the whole delta down so its global L2 norm is at most `max_norm`
  (bounds any one device's influence; the first half of client-side DP).
- `add_gaussian_noise`: add N(0, std^2) to every element (the second half; with
  std = noise_multiplier * clip_norm this is the Gaussian mechanism of DP-FedAvg).
- `TopK`: keep only the largest-magnitude fraction of each tensor and carry what was
  not sent over to the next round (error feedback), so nothing is lost, only delayed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from engine.serialize.update import topk_count, topk_indices

Delta = dict[str, np.ndarray]


def global_l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def clip_by_l2(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[Delta, float]:
    """Return (delta scaled to norm <= max_norm, the norm before clipping)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_l2_norm(delta)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: np.asarray(v, np.float32) * np.float32(factor) for k, v in delta.items()}
    return clipped, norm


def add_gaussian_noise(delta: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Delta:
    """Return delta + N(0, std^2) elementwise (a new dict; the input is not modified)."""
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std!r}")
    return {
        k: (np.asarray(v, np.float32) + rng.normal(0.0, std, size=np.shape(v))).astype(np.float32)
        for k, v in delta.items()
    }


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

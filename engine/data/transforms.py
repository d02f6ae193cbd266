"""Per-item transforms for (C, H, W) float arrays; wrap a view with TransformedView to apply them.

Random transforms own a generator seeded once, so a run is reproducible from
its seeds while every epoch still sees different crops and flips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def _check_image(x: np.ndarray, who: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (2, 3):
        raise ValueError(f"{who}: expects an (H, W) or (C, H, W) image, got shape {x.shape}")
    return x


class Normalize:
    """(x - mean) / std, with one mean/std per channel (axis 0) or one for all."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        if self.mean.size != self.std.size:
            raise ValueError(f"Normalize: {self.mean.size} means but {self.std.size} stds")
        if np.any(self.std <= 0):
            raise ValueError(f"Normalize: std must be > 0, got {self.std.tolist()}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.mean.size == 1:
            return (x - self.mean[0]) / self.std[0]
        if x.ndim != 3 or x.shape[0] != self.mean.size:
            raise ValueError(f"Normalize: {self.mean.size} channel means for an item of shape {x.shape}")
        return (x - self.mean[:, None, None]) / self.std[:, None, None]


class RandomCrop:
    """Zero-pad by `padding` on each side, then cut a random `size` window (as in CIFAR training)."""

    def __init__(self, size: int | tuple[int, int], padding: int = 0, seed: int = 0):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"RandomCrop: size must be a positive int or (height, width), got {size!r}")
        if padding < 0:
            raise ValueError(f"RandomCrop: padding must be >= 0, got {padding}")
        self.padding = padding
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_image(x, "RandomCrop")
        p = self.padding
        if p:
            x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)])
        h, w = x.shape[-2:]
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"RandomCrop: crop {self.size} larger than padded image {(h, w)}")
        top = int(self.rng.integers(0, h - ch + 1))
        left = int(self.rng.integers(0, w - cw + 1))
        return x[..., top : top + ch, left : left + cw]


class RandomHorizontalFlip:
    """Mirror the image left-right with probability p."""

    def __init__(self, p: float = 0.5, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = p
        self.rng = np.random.default_rng(seed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _check_image(x, "RandomHorizontalFlip")
        return x[..., ::-1].copy() if self.rng.random() < self.p else x


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            x = transform(x)
        return x

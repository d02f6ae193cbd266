"""MnistDataset: MNIST or Fashion-MNIST from a directory of IDX files.

The directory holds the four standard files, raw or gzipped:
train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte. Pixels stay uint8 in memory (a quarter of the float
size, which matters on a phone) and are converted per batch: scaled to
[0, 1], normalized with (x - mean) / std, then zero-padded - the order of
MegEngine's LeNet example (Normalize, then Pad(2) to reach 32x32).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from .dataview import IDataView, Item
from .idx import DataError, read_idx

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # MegEngine LeNet example defaults


def find_idx_file(directory: Path, stem: str) -> Path:
    """`stem` in `directory`, as .gz or raw; also accepts the 'train-images.idx3-ubyte' spelling."""
    dotted = stem.replace("-idx", ".idx", 1)
    for name in (stem + ".gz", stem, dotted + ".gz", dotted):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: no {stem} or {stem}.gz found (expected an MNIST-style IDX directory)")


def is_idx_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding the images and labels of a train or test split."""
    directory = Path(path)
    for prefix in SPLIT_PREFIX.values():
        try:
            find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
            find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
        except DataError:
            continue
        return True
    return False


class MnistDataset(IDataView):
    """Images (1, H, W) float32 and int64 labels from an IDX directory."""

    def __init__(
        self,
        dir_name: str | os.PathLike,
        split: str = "train",
        normalize: bool = True,
        pad: int = 0,
        limit: int | None = None,
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
    ):
        if split not in SPLIT_PREFIX:
            raise ValueError(f"MnistDataset: split must be 'train' or 'test', got {split!r}")
        if pad < 0:
            raise ValueError(f"MnistDataset: pad must be >= 0, got {pad}")
        if std <= 0:
            raise ValueError(f"MnistDataset: std must be > 0, got {std}")
        directory = Path(dir_name)
        if not directory.is_dir():
            raise DataError(f"{directory}: not a directory")
        prefix = SPLIT_PREFIX[split]
        images_path = find_idx_file(directory, f"{prefix}-images-idx3-ubyte")
        labels_path = find_idx_file(directory, f"{prefix}-labels-idx1-ubyte")
        raw = read_idx(images_path, expected_ndim=3)
        labels = read_idx(labels_path, expected_ndim=1)
        if len(raw) != len(labels):
            raise DataError(
                f"{directory}: {images_path.name} has {len(raw)} images but {labels_path.name} has {len(labels)} labels"
            )
        if limit is not None:
            if limit < 1:
                raise ValueError(f"MnistDataset: limit must be >= 1, got {limit}")
            raw, labels = raw[:limit], labels[:limit]
        self.directory, self.split = directory, split
        self.normalize, self.pad, self.mean, self.std = normalize, int(pad), float(mean), float(std)
        self.raw = raw  # (N, H, W) uint8
        self.labels = labels.astype(np.int64)

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W) -> float32 (B, 1, H + 2 pad, W + 2 pad)."""
        x = raw.astype(np.float32) / np.float32(255.0)
        if self.normalize:
            x = (x - np.float32(self.mean)) / np.float32(self.std)
        if self.pad:
            x = np.pad(x, ((0, 0), (self.pad, self.pad), (self.pad, self.pad)))
        return x[:, None, :, :]

    @cached_property
    def images(self) -> np.ndarray:
        """All images as one (N, 1, H, W) float32 array (built on first use)."""
        return self._convert(self.raw)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, self.raw.shape[1] + 2 * self.pad, self.raw.shape[2] + 2 * self.pad)

    def get_item(self, idx: int) -> Item:
        return self._convert(self.raw[np.array([idx])])[0], self.labels[idx]

    def size(self) -> int:
        return len(self.labels)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        if "images" in self.__dict__:  # already materialized: just gather
            return self.images[indices], self.labels[indices]
        return self._convert(self.raw[indices]), self.labels[indices]

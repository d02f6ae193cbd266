"""Which samples each simulated device holds: one pure function of (data, N, partition, seed).

The orchestrator, every worker process and every docker replica call `device_indices` with the
same arguments and so agree on the shards without shipping index lists around.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data import IDataView, Subset, embedded_dir, open_dataset, parse_partition


def resolve_data(data: str | None) -> Path:
    """The dataset directory: the given one, or the Fashion-MNIST subset embedded in the engine."""
    return embedded_dir() if data in (None, "", "embedded") else Path(data)


def load_split(data: str | None, split: str) -> IDataView:
    return open_dataset(resolve_data(data), split=split)


def labels_of(dataset: IDataView) -> np.ndarray:
    """All labels of a dataset (read in one batch when the reader keeps them in memory)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels).reshape(-1)
    return np.asarray(dataset.get_batch(np.arange(dataset.size()))[1]).reshape(-1)


def device_indices(
    labels: np.ndarray, n_devices: int, partition: str, seed: int, samples_per_device: int | None = None
) -> list[np.ndarray]:
    """Per-device sorted sample indices; with `samples_per_device`, a seeded random subset of each part."""
    parts = parse_partition(partition)(labels, n_devices, seed)
    if samples_per_device is None:
        return parts
    if samples_per_device < 1:
        raise ValueError(f"samples_per_device must be >= 1, got {samples_per_device}")
    rng = np.random.default_rng(seed + 1)
    return [np.sort(rng.choice(p, size=min(samples_per_device, len(p)), replace=False)) for p in parts]


def device_dataset(dataset: IDataView, parts: list[np.ndarray], index: int) -> IDataView:
    if not 0 <= index < len(parts):
        raise ValueError(f"device index {index} is outside 0..{len(parts) - 1}")
    return Subset(dataset, parts[index])

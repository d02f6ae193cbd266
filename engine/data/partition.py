"""Split one dataset's samples across simulated devices, the ways federated papers do.

Every function takes the label array of the whole dataset and returns one
sorted index array per device; together they use every sample exactly once.
Everything is a pure function of (labels, n_devices, parameter, seed).

- iid:           a random permutation dealt out in near-equal parts.
- dirichlet:     label skew; each class is split across devices in
                 proportions ~ Dirichlet(alpha). Small alpha -> few labels per device.
- shards:        the FedAvg paper's pathological split: sort by label, cut into
                 shards_per_device * D shards, give each device shards_per_device of them.
- quantity_skew: device sizes ~ Dirichlet(alpha) (NIID-Bench), labels mixed IID.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Partition = list[np.ndarray]


def _check(labels: np.ndarray, n_devices: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1)
    if not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise ValueError(f"partition: n_devices must be an integer >= 1, got {n_devices!r}")
    if len(labels) < n_devices:
        raise ValueError(f"partition: {len(labels)} samples cannot give each of {n_devices} devices one")
    return labels


def _sizes_at_least_one(proportions: np.ndarray, n: int) -> np.ndarray:
    """Integer sizes summing to n, each >= 1, close to n * proportions (largest remainders)."""
    d = len(proportions)
    share = proportions / proportions.sum() * (n - d)
    sizes = np.floor(share).astype(np.int64)
    leftover = (n - d) - int(sizes.sum())
    sizes[np.argsort(-(share - sizes), kind="stable")[:leftover]] += 1
    return sizes + 1


def iid(labels: np.ndarray, n_devices: int, seed: int = 0) -> Partition:
    """Uniformly random, sizes differing by at most one."""
    labels = _check(labels, n_devices)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, n_devices)]


def dirichlet(labels: np.ndarray, n_devices: int, alpha: float = 0.5, seed: int = 0) -> Partition:
    """Label skew: each class spread over devices with Dirichlet(alpha) proportions; no device left empty."""
    labels = _check(labels, n_devices)
    if alpha <= 0:
        raise ValueError(f"dirichlet: alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(n_devices, float(alpha)))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for device, chunk in enumerate(np.split(members, cuts)):
            parts[device].append(chunk)
    result = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    for device in range(n_devices):  # a device with nothing takes one sample from the largest device
        if len(result[device]) == 0:
            donor = int(np.argmax([len(r) for r in result]))
            result[device], result[donor] = result[donor][-1:], result[donor][:-1]
    return [np.sort(r) for r in result]


def shards(labels: np.ndarray, n_devices: int, shards_per_device: int = 2, seed: int = 0) -> Partition:
    """FedAvg's split: label-sorted shards dealt at random, shards_per_device each."""
    labels = _check(labels, n_devices)
    if shards_per_device < 1:
        raise ValueError(f"shards: shards_per_device must be >= 1, got {shards_per_device}")
    n_shards = n_devices * shards_per_device
    if n_shards > len(labels):
        raise ValueError(f"shards: {n_shards} shards need at least that many samples, got {len(labels)}")
    by_label = np.argsort(labels, kind="stable")
    pieces = np.array_split(by_label, n_shards)
    dealt = np.random.default_rng(seed).permutation(n_shards).reshape(n_devices, shards_per_device)
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in dealt]


def quantity_skew(labels: np.ndarray, n_devices: int, alpha: float = 1.0, seed: int = 0) -> Partition:
    """Unequal device sizes ~ Dirichlet(alpha) (each >= 1), samples within a device IID."""
    labels = _check(labels, n_devices)
    if alpha <= 0:
        raise ValueError(f"quantity_skew: alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    sizes = _sizes_at_least_one(rng.dirichlet(np.full(n_devices, float(alpha))), len(labels))
    order = rng.permutation(len(labels))
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed "--partition" value; call it with (labels, n_devices, seed)."""

    name: str
    param: float | None = None

    def __call__(self, labels: np.ndarray, n_devices: int, seed: int = 0) -> Partition:
        if self.name == "iid":
            return iid(labels, n_devices, seed)
        if self.name == "dirichlet":
            return dirichlet(labels, n_devices, self.param, seed)
        if self.name == "shards":
            return shards(labels, n_devices, int(self.param), seed)
        return quantity_skew(labels, n_devices, self.param, seed)

    def __str__(self) -> str:
        return self.name if self.param is None else f"{self.name}:{self.param:g}"


_DEFAULTS: dict[str, float | None] = {"iid": None, "dirichlet": 0.5, "shards": 2, "quantity": 1.0}


def parse_partition(spec: str) -> PartitionSpec:
    """'iid' | 'dirichlet:ALPHA' | 'shards:PER_DEVICE' | 'quantity:ALPHA' (parameter optional)."""
    name, _, raw = spec.strip().partition(":")
    if name not in _DEFAULTS:
        raise ValueError(f"unknown partition {spec!r}; expected iid, dirichlet:ALPHA, shards:N or quantity:ALPHA")
    if name == "iid":
        if raw:
            raise ValueError(f"partition 'iid' takes no parameter, got {spec!r}")
        return PartitionSpec("iid")
    try:
        param = float(raw) if raw else float(_DEFAULTS[name])
    except ValueError:
        raise ValueError(f"partition {spec!r}: parameter {raw!r} is not a number") from None
    if param <= 0 or not np.isfinite(param):
        raise ValueError(f"partition {spec!r}: parameter must be a positive number")
    if name == "shards" and param != int(param):
        raise ValueError(f"partition {spec!r}: shards per device must be a whole number")
    return PartitionSpec(name, param)


def split_holdout(indices: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) parts of one device's indices; held_out is round(fraction * n) samples,
    at least one when fraction > 0 and n >= 2, and train always keeps at least one."""
    indices = np.asarray(indices).reshape(-1)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split_holdout: fraction must be in [0, 1), got {fraction}")
    n = len(indices)
    n_hold = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        n_hold = max(n_hold, 1)
    n_hold = min(n_hold, max(n - 1, 0))
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(indices[order[n_hold:]]), np.sort(indices[order[:n_hold]])


def label_counts(labels: np.ndarray, parts: Partition, n_classes: int | None = None) -> np.ndarray:
    """(n_devices, n_classes) table of how many samples of each class each device holds."""
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])

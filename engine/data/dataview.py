"""IDataView: the one interface every dataset implements (MegEngine's, Pythonized).

A view answers two questions: how many items (`size()`) and what is item i
(`get_item(i)` -> (data, label)). Anything that answers them can feed a
DataLoader. `get_batch(indices)` is an optional fast path: the default stacks
`get_item` results, in-memory views override it with one fancy-indexing call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

Item = tuple[np.ndarray, "np.ndarray | int"]


class IDataView(ABC):
    """A random-access dataset of (data, label) pairs."""

    @abstractmethod
    def get_item(self, idx: int) -> Item:
        """The (data, label) pair at position idx, 0 <= idx < size()."""

    @abstractmethod
    def size(self) -> int:
        """Number of items."""

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Items at `indices`, stacked along a new first axis."""
        items = [self.get_item(int(i)) for i in indices]
        return np.stack([np.asarray(d) for d, _ in items]), np.stack([np.asarray(lbl) for _, lbl in items])

    def _check_index(self, idx: int) -> int:
        n = self.size()
        if not -n <= idx < n:
            raise IndexError(f"{type(self).__name__}: index {idx} out of range for size {n}")
        return idx % n

    def __len__(self) -> int:
        return self.size()

    def __getitem__(self, idx: int) -> Item:
        return self.get_item(self._check_index(int(idx)))


class ArrayDataset(IDataView):
    """An in-memory view over two arrays with the same first dimension."""

    def __init__(self, data: np.ndarray, labels: np.ndarray):
        data, labels = np.asarray(data), np.asarray(labels)
        if data.ndim == 0 or labels.ndim == 0:
            raise ValueError("ArrayDataset: data and labels must have a first (item) axis")
        if len(data) != len(labels):
            raise ValueError(f"ArrayDataset: data has {len(data)} items but labels has {len(labels)}")
        self.data, self.labels = data, labels

    def get_item(self, idx: int) -> Item:
        return self.data[idx], self.labels[idx]

    def size(self) -> int:
        return len(self.data)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return self.data[indices], self.labels[indices]


class Subset(IDataView):
    """The items of `view` at `indices`, in that order (a device's shard, a held-out part)."""

    def __init__(self, view: IDataView, indices: Sequence[int] | np.ndarray):
        self.view = view
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = view.size()
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(
                f"Subset: indices must lie in [0, {n}), got range [{self.indices.min()}, {self.indices.max()}]"
            )

    def get_item(self, idx: int) -> Item:
        return self.view.get_item(int(self.indices[idx]))

    def size(self) -> int:
        return int(self.indices.size)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.view.get_batch(self.indices[np.asarray(indices, dtype=np.int64)])


class TransformedView(IDataView):
    """`view` with `transform(data) -> data` applied to every item as it is read."""

    def __init__(self, view: IDataView, transform: Callable[[np.ndarray], np.ndarray]):
        self.view, self.transform = view, transform

    def get_item(self, idx: int) -> Item:
        data, label = self.view.get_item(idx)
        return self.transform(data), label

    def size(self) -> int:
        return self.view.size()

"""DataLoader: turns an IDataView into batches, epoch after epoch.

As in MegEngine, `next()` always returns a batch: when an epoch runs out the
loader starts the next one by itself. Unlike MegEngine's loader, which
shuffled once and then repeated that order forever, each epoch draws a fresh
permutation from one generator seeded once, so the sequence of orders is
different every epoch yet identical for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .dataview import IDataView

Batch = tuple[np.ndarray, np.ndarray]


class DataLoader:
    """Batches of (float32 data, int64 or float32 labels) from `dataset`."""

    def __init__(
        self, dataset: IDataView, batch_size: int = 1, shuffle: bool = False, drop_last: bool = True, seed: int = 0
    ):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be an integer >= 1, got {batch_size!r}")
        n = dataset.size()
        if n == 0:
            raise ValueError("DataLoader: the dataset is empty")
        if drop_last and batch_size > n:
            raise ValueError(
                f"DataLoader: batch_size {batch_size} > dataset size {n} with drop_last=True "
                "would give no batch at all; lower batch_size or pass drop_last=False"
            )
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rng = np.random.default_rng(seed)  # kept for the loader's life: never re-seeded per epoch
        self.epoch = 0  # number of epochs started by next()
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._batch_in_epoch = self.size()  # "current epoch used up": the first next() starts epoch 1

    def size(self) -> int:
        """Batches per epoch: floor(n / batch) with drop_last, ceil(n / batch) without."""
        n = self.dataset.size()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.size()

    def _new_order(self) -> np.ndarray:
        n = self.dataset.size()
        return self.rng.permutation(n) if self.shuffle else np.arange(n, dtype=np.int64)

    def _batch(self, order: np.ndarray, k: int) -> Batch:
        data, labels = self.dataset.get_batch(order[k * self.batch_size : (k + 1) * self.batch_size])
        data = np.asarray(data, dtype=np.float32)
        labels = np.asarray(labels)
        labels = labels.astype(np.int64) if labels.dtype.kind in "iub" else labels.astype(np.float32)
        return data, labels

    def next(self) -> Batch:
        """The next batch; starts a new epoch (new permutation) when the current one is used up."""
        if self._batch_in_epoch >= self.size():
            self._order, self._batch_in_epoch = self._new_order(), 0
            self.epoch += 1
        batch = self._batch(self._order, self._batch_in_epoch)
        self._batch_in_epoch += 1
        return batch

    def __next__(self) -> Batch:
        return self.next()

    def __iter__(self) -> Iterator[Batch]:
        """One full epoch with its own fresh permutation (drawn from the same generator as next())."""
        order = self._new_order()
        for k in range(self.size()):
            yield self._batch(order, k)

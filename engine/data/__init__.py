"""Data for the engine: IDataView, DataLoader, dataset readers, transforms and device partitions.

from engine.data import DataLoader, load_default
loader = DataLoader(load_default("train"), batch_size=64, shuffle=True, seed=0)
images, labels = loader.next()   # float32 (64, 1, 28, 28), int64 (64,)
"""

from __future__ import annotations

from pathlib import Path

from .dataview import ArrayDataset, IDataView, Subset, TransformedView
from .idx import DataError, read_idx, write_idx
from .loader import DataLoader
from .mnist import MnistDataset
from .partition import (
    PartitionSpec,
    dirichlet,
    iid,
    label_counts,
    parse_partition,
    quantity_skew,
    shards,
    split_holdout,
)
from .preprocessing import MNIST, NONE, PreprocessedView, Preprocessing, preprocessing_for, record_preprocessing
from .readers import CsvDataset, ImageFolderDataset, NpzDataset, open_dataset
from .transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def embedded_dir() -> Path:
    """Directory of the Fashion-MNIST subset shipped inside the package (see its LICENSE file)."""
    return Path(__file__).parent / "embedded"


def load_default(split: str = "train", **options) -> MnistDataset:
    """The embedded Fashion-MNIST subset as an MnistDataset (options go to MnistDataset)."""
    return MnistDataset(embedded_dir(), split=split, **options)


__all__ = [
    "ArrayDataset",
    "Compose",
    "CsvDataset",
    "DataError",
    "DataLoader",
    "FASHION_MNIST_CLASSES",
    "IDataView",
    "ImageFolderDataset",
    "MNIST",
    "MnistDataset",
    "NONE",
    "Normalize",
    "NpzDataset",
    "PartitionSpec",
    "PreprocessedView",
    "Preprocessing",
    "RandomCrop",
    "RandomHorizontalFlip",
    "Subset",
    "TransformedView",
    "dirichlet",
    "embedded_dir",
    "iid",
    "label_counts",
    "load_default",
    "open_dataset",
    "parse_partition",
    "preprocessing_for",
    "quantity_skew",
    "read_idx",
    "record_preprocessing",
    "shards",
    "split_holdout",
    "write_idx",
]

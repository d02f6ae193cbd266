"""Datasets from common files: .npz, .csv, a folder of images per class - and open_dataset(path).

Each reader is an IDataView, so anything below feeds a DataLoader unchanged.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .dataview import ArrayDataset, IDataView, Item
from .idx import DataError
from .mnist import MnistDataset, is_idx_dir

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class NpzDataset(ArrayDataset):
    """Arrays `x_key` (data) and `y_key` (labels) from a .npz file; pickled objects are refused."""

    def __init__(self, path: str | os.PathLike, x_key: str = "x", y_key: str = "y"):
        self.path = Path(path)
        try:
            archive = np.load(self.path, allow_pickle=False)
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        except (ValueError, OSError, EOFError) as exc:  # pickled content, not a numpy file at all
            raise DataError(f"{self.path}: cannot read as .npz without pickle ({exc})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{self.path}: is a single .npy array, expected a .npz holding {x_key!r} and {y_key!r}")
        with archive:
            missing = [k for k in (x_key, y_key) if k not in archive.files]
            if missing:
                raise DataError(
                    f"{self.path}: no array named {', '.join(map(repr, missing))}; the file holds {archive.files}"
                )
            try:
                data, labels = archive[x_key], archive[y_key]
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:  # object arrays, corrupt zip
                raise DataError(f"{self.path}: cannot read as .npz without pickle ({exc})") from None
        try:
            super().__init__(data, labels)
        except ValueError as exc:
            raise DataError(f"{self.path}: {exc}") from None


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


class CsvDataset(ArrayDataset):
    """One item per row: a label column and numeric features, optionally reshaped to `shape`.

    A first row that is not all numbers is taken as the header. `label_column`
    is a header name or a column index (negative counts from the end).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        label_column: str | int = "label",
        shape: tuple[int, ...] | None = None,
        delimiter: str = ",",
    ):
        self.path = Path(path)
        try:
            with open(self.path, encoding="utf-8") as f:
                first = f.readline()
        except FileNotFoundError:
            raise DataError(f"{self.path}: file not found") from None
        fields = [s.strip() for s in first.rstrip("\r\n").split(delimiter)]
        has_header = not all(_is_number(s) for s in fields)
        self.header = fields if has_header else None
        column = self._label_index(label_column, fields)
        try:
            table = np.loadtxt(self.path, delimiter=delimiter, skiprows=int(has_header), ndmin=2, dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{self.path}: not a numeric CSV ({exc})") from None
        if table.shape[0] == 0:
            raise DataError(f"{self.path}: no data rows")
        labels = table[:, column]
        features = np.delete(table, column, axis=1).astype(np.float32)
        whole = np.all(labels == np.round(labels))  # class ids -> int64, regression targets -> float32
        labels = labels.astype(np.int64 if whole else np.float32)
        if shape is not None:
            if int(np.prod(shape)) != features.shape[1]:
                raise DataError(
                    f"{self.path}: {features.shape[1]} feature columns cannot be reshaped to {tuple(shape)}"
                )
            features = features.reshape((len(features), *shape))
        super().__init__(features, labels)

    def _label_index(self, label_column: str | int, fields: list[str]) -> int:
        if isinstance(label_column, str):
            if self.header is None:
                raise DataError(
                    f"{self.path}: label column {label_column!r} given by name but the file "
                    "has no header row; pass a column index instead"
                )
            if label_column not in self.header:
                raise DataError(f"{self.path}: no column {label_column!r}; header is {self.header}")
            return self.header.index(label_column)
        if not -len(fields) <= label_column < len(fields):
            raise DataError(f"{self.path}: label column {label_column} out of range for {len(fields)} columns")
        return label_column % len(fields)


def _require_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("ImageFolderDataset needs Pillow: pip install 'pocketfed[images]'") from None
    return Image


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataset(IDataView):
    """root/<class name>/<image file>: classes numbered in sorted name order, images read on demand."""

    def __init__(self, root: str | os.PathLike, size: tuple[int, int] = (28, 28), grayscale: bool = True):
        self._image = _require_pillow()
        self.root, self.size_hw, self.grayscale = Path(root), tuple(size), grayscale
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory")
        self.classes = [d.name for d in _class_dirs(self.root)]
        if not self.classes:
            raise DataError(f"{self.root}: no class sub-folders (expected root/<class>/<image files>)")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [(path, i) for i, name in enumerate(self.classes) for path in _images_in(self.root / name)]
        if not self.samples:
            raise DataError(f"{self.root}: class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")

    def get_item(self, idx: int) -> Item:
        path, label = self.samples[idx]
        try:
            with self._image.open(path) as img:
                img = img.convert("L" if self.grayscale else "RGB")
                img = img.resize((self.size_hw[1], self.size_hw[0]), self._image.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        except OSError as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None
        data = pixels[None] if self.grayscale else pixels.transpose(2, 0, 1)
        return data, np.int64(label)

    def size(self) -> int:
        return len(self.samples)


def _is_image_folder(path: Path) -> bool:
    return any(_images_in(d) for d in _class_dirs(path))


def open_dataset(path: str | os.PathLike, split: str = "train", **options: Any) -> IDataView:
    """The right reader for `path`: an IDX directory, a .npz, a .csv or a folder of class folders.

    `split` only applies to IDX directories; `options` go to the chosen reader.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if is_idx_dir(path):
            return MnistDataset(path, split=split, **options)
        if _is_image_folder(path):
            return ImageFolderDataset(path, **options)
        raise DataError(
            f"{path}: directory is neither an IDX dataset (t10k-images-idx3-ubyte[.gz] ...) "
            "nor an image folder (root/<class>/<images>)"
        )
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return NpzDataset(path, **options)
    if suffix == ".csv":
        return CsvDataset(path, **options)
    raise DataError(
        f"{path}: unsupported file type {suffix or '(none)'!r}; expected an IDX directory, "
        ".npz, .csv or an image folder"
    )

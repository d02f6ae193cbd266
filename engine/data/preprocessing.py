"""The input preprocessing a model expects travels with the model (its metadata), so training,
evaluation, the device agent and the coordinator all feed it what it was trained on.

A `Preprocessing` starts from images whose pixels are scaled to [0, 1] (what PyTorch's
`ToTensor()` gives, and what every reader here produces before normalization), subtracts a
per-channel mean, divides by a per-channel std, then zero-pads `pad` pixels on each side.
`none` is the identity on [0, 1] pixels; `mnist` is LeNet's (0.1307, 0.3081).

    prep = preprocessing_for(model)                  # what the model records (or the default)
    train = prep.view(open_dataset(path), model)     # a dataset feeding the model's input shape
    batch = prep.apply(pixels)                       # one batch of [0, 1] images
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dataview import IDataView, Item, Subset
from .idx import DataError
from .mnist import MNIST_MEAN, MNIST_STD, MnistDataset

METADATA_KEY = "preprocessing"
MAX_PAD = 64
MAX_CHANNELS = 64


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, ...] = ()  # empty: no normalization
    std: tuple[float, ...] = ()
    pad: int = 0

    def __post_init__(self) -> None:
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if len(mean) != len(std) or len(mean) > MAX_CHANNELS:
            raise ValueError(f"preprocessing: {len(mean)} means but {len(std)} stds (at most {MAX_CHANNELS})")
        if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"preprocessing: means must be finite and stds positive, got {mean} / {std}")
        if not isinstance(self.pad, int) or isinstance(self.pad, bool) or not 0 <= self.pad <= MAX_PAD:
            raise ValueError(f"preprocessing: pad must be an integer in [0, {MAX_PAD}], got {self.pad!r}")

    # ----- names -----
    @classmethod
    def parse(cls, spec: str | Preprocessing) -> Preprocessing:
        """`none`, `mnist`, or `MEAN,STD` (per channel: `M1:M2:M3,S1:S2:S3`); `+padN` pads by N."""
        if isinstance(spec, Preprocessing):
            return spec
        text, pad = spec.strip().lower(), 0
        if "+pad" in text:
            text, _, count = text.partition("+pad")
            if not count.isdigit():
                raise ValueError(f"preprocessing {spec!r}: +pad needs a number of pixels")
            pad = int(count)
        if text == "none":
            return cls(pad=pad)
        if text == "mnist":
            return cls((MNIST_MEAN,), (MNIST_STD,), pad)
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            mean, std = ([float(v) for v in part.split(":")] for part in parts)
        except ValueError:
            raise ValueError(f"preprocessing {spec!r}: expected none, mnist or MEAN,STD (e.g. 0.5,0.25)") from None
        return cls(tuple(mean), tuple(std), pad)

    def describe(self) -> str:
        if not self.mean:
            text = "none (pixels scaled to [0, 1])"
        elif self == Preprocessing((MNIST_MEAN,), (MNIST_STD,), self.pad):
            text = f"mnist (mean {MNIST_MEAN}, std {MNIST_STD})"
        else:
            text = f"mean {list(self.mean)}, std {list(self.std)}"
        return text + (f", padded by {self.pad}" if self.pad else "")

    # ----- model metadata -----
    def to_metadata(self) -> dict[str, Any]:
        return {"input": "pixels/255", "mean": list(self.mean), "std": list(self.std), "pad": self.pad}

    @classmethod
    def from_metadata(cls, record: Any) -> Preprocessing:
        """From a model file's record; a malformed one is an error, never a silent default."""
        if not isinstance(record, Mapping) or record.get("input") != "pixels/255":
            raise ValueError(f"model metadata: preprocessing record {record!r} is not understood")
        mean, std, pad = record.get("mean"), record.get("std"), record.get("pad", 0)
        numbers = (int, float)
        if not isinstance(mean, list) or not isinstance(std, list):
            raise ValueError(f"model metadata: preprocessing mean/std must be lists, got {mean!r} / {std!r}")
        if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in [*mean, *std]):
            raise ValueError(f"model metadata: preprocessing mean/std must hold numbers, got {mean!r} / {std!r}")
        return cls(tuple(mean), tuple(std), pad)

    # ----- applying it -----
    def apply(self, batch: np.ndarray) -> np.ndarray:
        """A batch of images, (N, C, H, W) or (N, H, W), as the model's float32 input. Pixels are
        floats in [0, 1], or integers in [0, 255] (uint8 photos), which are scaled to [0, 1] first."""
        raw = np.asarray(batch)
        x = raw.astype(np.float32) / np.float32(255.0) if raw.dtype.kind in "ui" else np.asarray(raw, np.float32)
        if self.mean:
            if x.ndim == 4:
                if len(self.mean) not in (1, x.shape[1]):
                    raise DataError(f"preprocessing: {len(self.mean)} channel means for a batch of shape {x.shape}")
                view = (1, -1, 1, 1)
            else:
                if len(self.mean) != 1:
                    raise DataError(f"preprocessing: {len(self.mean)} channel means for a batch of shape {x.shape}")
                view = (1,)
            mean = np.asarray(self.mean, np.float32).reshape(view)
            std = np.asarray(self.std, np.float32).reshape(view)
            x = (x - mean) / std
        if self.pad:
            if x.ndim < 3:
                raise DataError(f"preprocessing: cannot pad a batch of shape {x.shape}")
            p = self.pad
            x = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)])
        return x

    def view(self, dataset: IDataView, model: Any = None) -> IDataView:
        """`dataset` preprocessed, its items reshaped to the model's input (e.g. (1, 28, 28) images
        as (28, 28) sequences) when the element counts agree. The dataset's own normalization
        (an IDX directory's MNIST default) is replaced, not stacked."""
        item_shape = None
        if model is not None:
            shape = tuple(model.input.shape[1:])
            item_shape = shape if None not in shape else None
        if isinstance(dataset, PreprocessedView):
            dataset = dataset.source
        if isinstance(dataset, Subset):  # a device's shard or held-out part: preprocess what it selects from
            return Subset(self.view(dataset.view, model), dataset.indices)
        if isinstance(dataset, MnistDataset):
            converted = self._mnist(dataset)
            return (
                converted
                if item_shape in (None, converted.image_shape)
                else PreprocessedView(converted, None, item_shape)
            )
        return PreprocessedView(dataset, self, item_shape)

    def _mnist(self, dataset: MnistDataset) -> MnistDataset:
        if len(self.mean) > 1:
            raise DataError(f"preprocessing: {len(self.mean)} channel means for single-channel {dataset.directory}")
        out = copy.copy(dataset)  # shares the uint8 pixels; converts per batch with these settings
        out.__dict__.pop("images", None)
        out.normalize, out.pad = bool(self.mean), self.pad
        if self.mean:
            out.mean, out.std = self.mean[0], self.std[0]
        return out


NONE = Preprocessing()
MNIST = Preprocessing((MNIST_MEAN,), (MNIST_STD,))


class PreprocessedView(IDataView):
    """`source` with `prep` applied per batch (None: as is), items reshaped to `item_shape`."""

    def __init__(self, source: IDataView, prep: Preprocessing | None, item_shape: Sequence[int] | None = None):
        self.source, self.prep = source, prep
        self.item_shape = None if item_shape is None else tuple(int(d) for d in item_shape)

    def _convert(self, data: np.ndarray) -> np.ndarray:
        x = self.prep.apply(data) if self.prep is not None else np.asarray(data, np.float32)
        if self.item_shape is not None and x.shape[1:] != self.item_shape:
            if int(np.prod(x.shape[1:])) != int(np.prod(self.item_shape)):
                raise DataError(f"data items of shape {x.shape[1:]} do not fit the model's input {self.item_shape}")
            x = x.reshape((len(x), *self.item_shape))
        return x

    def get_item(self, idx: int) -> Item:
        data, label = self.source.get_item(idx)
        return self._convert(np.asarray(data)[None])[0], label

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        data, labels = self.source.get_batch(indices)
        return self._convert(data), labels

    def size(self) -> int:
        return self.source.size()


def preprocessing_for(model: Any, override: str | Preprocessing | None = None) -> Preprocessing:
    """What `model` is fed: `override` when given; else what its metadata records; else `none`
    for an imported ONNX file and `mnist` for a pocketfed file from before models recorded it
    (the engine's LeNet was trained that way)."""
    if override is not None:
        return Preprocessing.parse(override)
    metadata = getattr(model, "metadata", {}) or {}
    if METADATA_KEY in metadata:
        return Preprocessing.from_metadata(metadata[METADATA_KEY])
    return NONE if metadata.get("source") == "onnx" else MNIST


def record_preprocessing(model: Any, prep: Preprocessing) -> None:
    """Write `prep` into the model's metadata (saved with it by `engine.save` and ONNX export)."""
    model.metadata[METADATA_KEY] = prep.to_metadata()

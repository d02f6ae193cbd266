"""What the scripted coordinator serves and checks against: a real model file (LeNet from
`engine.models`), real local data (a slice of the embedded Fashion-MNIST, written as .npz for the
agent), and the numbers a check needs (trainable shapes, base weights, the loss on that data).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from engine.data import ArrayDataset, load_default
from engine.models import build_model_bytes
from engine.serialize.container import dumps, loads

MODEL_VERSION = 3  # not 0 or 1: an agent that ignores base_version shows up


@dataclass
class World:
    """The fixtures of one suite run (built once, shared by every scenario)."""

    workdir: Path
    samples: int = 64
    seed: int = 0
    model_bytes: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_bytes = build_model_bytes("lenet", seed=self.seed)
        container = loads(self.model_bytes, kind="model")
        self.metadata = container.metadata
        self.trainable: list[str] = list(container.metadata["trainable"])
        self.weights = {name: container.tensors[name] for name in self.trainable}
        self.shapes = {name: tuple(w.shape) for name, w in self.weights.items()}
        train = load_default("train")
        picked = np.random.default_rng(self.seed).choice(train.size(), self.samples, replace=False)
        self.x, self.y = train.get_batch(np.sort(picked))
        self.x = np.ascontiguousarray(self.x, np.float32)
        self.y = np.ascontiguousarray(self.y, np.int64)
        self.data_path = self.workdir / "local-data.npz"
        np.savez(self.data_path, x=self.x, y=self.y)

    # ------------------------------------------------------------------ what is served

    @property
    def etag(self) -> str:
        return etag_of(self.model_bytes)

    @cached_property
    def tampered_model(self) -> bytes:
        """A well-formed model file with other weights (its own checksum holds; the ETag of the real
        one does not): what a compromised cache or a man in the middle would serve."""
        container = loads(self.model_bytes, kind="model")
        tensors = dict(container.tensors)
        last = self.trainable[-1]
        tensors[last] = (tensors[last] + np.float32(3.0)).astype(np.float32)
        return dumps(tensors, container.metadata, kind="model")

    @cached_property
    def training_step(self) -> bytes | None:
        """The ONNX training step of the model (GET /v1/models/{v}/training-step; docs/training-step.md):
        plain SGD, as the scenarios' tasks ask (momentum 0); None where the `onnx` package is missing."""
        if not self.training_step_available():
            return None
        from engine import load_model_bytes
        from engine.onnx import export_training_step

        return export_training_step(load_model_bytes(self.model_bytes), optimizer="sgd")

    @staticmethod
    def training_step_available() -> bool:
        import importlib.util

        return importlib.util.find_spec("onnx") is not None

    # ------------------------------------------------------------------ what is checked

    def loss(self, delta: dict[str, np.ndarray] | None = None) -> float:
        """Mean cross-entropy of base (+ delta) on the agent's data."""
        from engine import load_model_bytes
        from engine.trainer import evaluate_model

        model = load_model_bytes(self.model_bytes)
        if delta is not None:
            model.load_state_dict({n: self.weights[n] + delta[n] for n in self.trainable}, strict=False)
        return float(evaluate_model(model, ArrayDataset(self.x, self.y))["loss"])

    def weight_norm(self) -> float:
        return math.sqrt(sum(float(np.sum(np.square(w, dtype=np.float64))) for w in self.weights.values()))

    @cached_property
    def raw_windows(self) -> list[bytes]:
        """Byte strings that only raw local data would contain: rows of images as float32, and the label
        sequence in the usual integer widths."""
        windows = []
        for image in self.x[:16]:
            for row in image.reshape(-1, self.x.shape[-1]):
                if np.ptp(row) > 0:  # a row with some ink in it, not a constant margin
                    windows.append(row.astype("<f4").tobytes())
        labels = self.y[:32]
        windows += [labels.astype(dtype).tobytes() for dtype in ("<i8", "<i4", "u1")]
        windows.append(",".join(str(int(v)) for v in labels).encode())
        return windows

    def carries_raw_data(self, body: bytes) -> bool:
        return any(window in body for window in self.raw_windows)


def etag_of(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()}"'

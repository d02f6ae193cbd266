"""The ONNX training step of each model version (GET /v1/models/{version}/training-step).

Devices without the engine (the TypeScript agent, an app on onnxruntime-mobile) train by running
this one ONNX graph per batch (docs/training-step.md). It is exported from the version's own
model file, without weights (a device feeds those), and kept for the latest few
(version, optimizer) pairs: every device of a round asks for the same one.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

from coordinator.errors import Refused
from coordinator.service.versions import ModelVersions

OPTIMIZERS = ("sgd", "sgd-momentum", "adam")


@dataclass(frozen=True)
class TrainingStep:
    data: bytes
    sha256: str


class TrainingSteps:
    def __init__(self, versions: ModelVersions, capacity: int = 8) -> None:
        self.versions, self.capacity = versions, capacity
        self._cache: OrderedDict[tuple, TrainingStep] = OrderedDict()
        self._lock = threading.Lock()  # one export at a time: they are CPU-bound and the cache answers the rest

    def get(self, version: int, optimizer: str, momentum: float) -> TrainingStep:
        """The step of `version` for `optimizer` ("sgd-momentum" uses `momentum`); 404 when the
        version does not exist or its graph has no ONNX step (an operator without a lowering)."""
        if optimizer not in OPTIMIZERS:
            raise Refused(422, f"optimizer {optimizer!r} is not one of {list(OPTIMIZERS)}", "bad_optimizer")
        key = (version, optimizer, momentum if optimizer == "sgd-momentum" else None)
        with self._lock:
            step = self._cache.get(key)
            if step is None:
                step = self._export(version, optimizer, momentum)
                self._cache[key] = step
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
            return step

    def _export(self, version: int, optimizer: str, momentum: float) -> TrainingStep:
        loaded = self.versions.get(version)
        if loaded is None:
            raise Refused(404, f"model version {version} does not exist", "unknown_model")
        from engine.onnx import export_training_step
        from engine.serialize.modelfile import loads

        try:  # OnnxError (an operator without a lowering, no onnx package here), a graph the engine cannot load
            data = export_training_step(loads(loaded.data), optimizer=optimizer, momentum=momentum)
        except ValueError as e:
            raise Refused(404, f"model version {version} has no ONNX training step: {e}", "no_training_step") from e
        return TrainingStep(data, hashlib.sha256(data).hexdigest())

"""The ONNX training step of each model version (GET /v1/models/{version}/training-step).

Devices without the engine (the TypeScript agent, an app on onnxruntime-mobile) train by running
this one ONNX graph per batch (docs/training-step.md). It is exported from the version's own
model file, without weights (a device feeds those), so versions of one architecture (the same
graph_sha256 and trainable list) share one export; the latest few are kept in memory.
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
        self._cache: OrderedDict[tuple, TrainingStep | Refused] = OrderedDict()  # refusals too: asked again
        self._lock = threading.Lock()  # one export at a time: they are CPU-bound and the cache answers the rest

    def get(self, version: int, optimizer: str, momentum: float) -> TrainingStep:
        """The step of `version` for `optimizer` ("sgd-momentum" uses `momentum`); 404 when the
        version does not exist or its graph has no ONNX step (an operator without a lowering)."""
        if optimizer not in OPTIMIZERS:
            raise Refused(422, f"optimizer {optimizer!r} is not one of {list(OPTIMIZERS)}", "bad_optimizer")
        loaded = self.versions.get(version)
        if loaded is None:
            raise Refused(404, f"model version {version} does not exist", "unknown_model")
        meta = loaded.container.metadata
        graph = meta.get("graph_sha256") or f"version {version}"
        key = (graph, str(meta.get("trainable")), optimizer, momentum if optimizer == "sgd-momentum" else None)
        with self._lock:
            step = self._cache.get(key)
            if step is None:
                try:
                    step = self._export(version, loaded.data, optimizer, momentum)
                except Refused as refused:
                    step = refused
                self._cache[key] = step
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        if isinstance(step, Refused):
            raise step
        return step

    @staticmethod
    def _export(version: int, model_bytes: bytes, optimizer: str, momentum: float) -> TrainingStep:
        from engine.onnx import export_training_step
        from engine.serialize.modelfile import loads

        try:  # OnnxError (an operator without a lowering, no onnx package here), a graph the engine cannot load
            data = export_training_step(loads(model_bytes), optimizer=optimizer, momentum=momentum)
        except ValueError as e:
            raise Refused(404, f"model version {version} has no ONNX training step: {e}", "no_training_step") from e
        return TrainingStep(data, hashlib.sha256(data).hexdigest())

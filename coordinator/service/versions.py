"""Model versions: immutable, numbered, the file written before the row that registers it.

A version's file is written atomically *before* the transaction that registers it, so a registered
version always has its whole file; a crash in between leaves an orphan file that startup removes
(the round that produced it is still open and commits again, to the same weights).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import crash_point
from coordinator.service.modelfile import ModelInfo, model_info, parse_model, with_version
from coordinator.store import ModelFiles, Store, Writes
from engine.serialize.container import Container

log = logging.getLogger("pocketfed.coordinator")


@dataclass
class LoadedModel:
    version: int
    data: bytes
    container: Container
    info: ModelInfo


class ModelVersions:
    def __init__(self, store: Store, files: ModelFiles, on_published: Callable[[int, bytes], None] | None = None):
        self.store, self.files = store, files
        self.on_published = on_published or (lambda version, data: None)
        self._cache: dict[int, LoadedModel] = {}
        self._cache_lock = threading.Lock()

    def recover(self, initial_model: Callable[[], bytes]) -> None:
        """Startup: drop files no version registers; publish the initial model if there is none."""
        registered = self.store.version_filenames()
        self.files.remove_orphans(registered)
        if not registered:
            self.publish(initial_model(), reason="initial model")

    def latest(self) -> int:
        """The newest version; the initial model is version 0, and round N usually commits version N."""
        return self.store.latest_version()

    def get(self, version: int) -> LoadedModel | None:
        """A registered version's bytes and parsed tensors (the latest few stay cached)."""
        cached = self._cache.get(version)  # the common case needs no lock
        if cached is not None:
            return cached
        with self._cache_lock:
            if version in self._cache:
                return self._cache[version]
            row = self.store.version(version)
            if row is None:
                return None
            data = self.files.read(row.filename)
            container = parse_model(data)
            loaded = LoadedModel(version, data, container, model_info(data, container))
            if len(self._cache) >= 4:
                self._cache.pop(min(self._cache))
            self._cache[version] = loaded
            return loaded

    def publish(
        self,
        data: bytes,
        *,
        reason: str = "published",
        round_id: int | None = None,
        then: Callable[[Writes, int], None] | None = None,
    ) -> int:
        """Register model bytes as the next immutable version (file first, then the row).

        `then(tx, version)` runs in the same transaction as the registration (a round's commit
        closes the round and stores the server optimizer state there), so it is all-or-nothing."""
        container = parse_model(data)
        with self.store.lock:
            version = self.latest() + 1
            if container.metadata.get("version") != version:
                data = with_version(container, version)
                container = parse_model(data)
            info = model_info(data, container)
            filename = self.files.write(version, data)
            crash_point("before_register_model")
            with self.store.transaction() as tx:
                tx.add_version(
                    version,
                    sha256=info.sha256,
                    filename=filename,
                    architecture=info.architecture,
                    size_bytes=info.size_bytes,
                    num_parameters=info.num_parameters,
                    created_at=info.created_at,
                    round_id=round_id,
                )
                if then is not None:
                    then(tx, version)
        log.info(
            "model v%d registered (%s, %d parameters, sha256 %s): %s",
            version,
            info.architecture,
            info.num_parameters,
            info.sha256[:12],
            reason,
        )
        self.on_published(version, data)
        return version

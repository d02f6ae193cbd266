"""Model versions: immutable, numbered, their bytes stored by the transaction that registers them.

The bytes go to the blob store (files beside SQLite, rows in PostgreSQL: store/model_files.py)
inside the registering transaction, before its row, so a registered version always has all of
them; a crash in between leaves at most an orphan file that startup removes (the round that
produced it is still open and commits again, to the same weights). The next version number is
taken under the lifecycle lock, so two replicas never register the same one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.errors import crash_point
from coordinator.service.modelfile import ModelInfo, model_info, parse_model, with_version
from coordinator.store import BlobStore, Store, Writes
from engine.serialize.container import Container

log = logging.getLogger("pocketfed.coordinator")


@dataclass
class LoadedModel:
    version: int
    data: bytes
    container: Container
    info: ModelInfo


@dataclass(frozen=True)
class Registered:
    """A version registered by a transaction (announced once that transaction has committed)."""

    version: int
    data: bytes
    info: ModelInfo


class ModelVersions:
    def __init__(self, store: Store, files: BlobStore, on_published: Callable[[int, bytes], None] | None = None):
        self.store, self.files = store, files
        self.on_published = on_published or (lambda version, data: None)
        self._cache: dict[int, LoadedModel] = {}
        self._cache_lock = threading.Lock()

    def recover(self, initial_model: Callable[[], bytes]) -> None:
        """Startup: drop files no version registers; publish the initial model if there is none (once,
        however many replicas start together)."""
        self.files.remove_orphans(self.store.version_filenames())
        if self.latest() >= 0:
            return
        with self.store.lock:
            with self.store.transaction() as tx:
                tx.own_lifecycle()
                if self.latest() >= 0:  # another replica published it meanwhile
                    return
                registered = self.register(tx, initial_model())
            self.announce(registered, "initial model")

    def latest(self) -> int:
        """The newest version; the initial model is version 0, and round N usually commits version N."""
        return self.store.latest_version()

    def get(self, version: int) -> LoadedModel | None:
        """A registered version's bytes and parsed tensors (the latest few stay cached: they never change)."""
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
        """Register model bytes as the next immutable version, in one transaction of its own.

        `then(tx, version)` runs in the same transaction as the registration, so it is all-or-nothing."""
        parse_model(data)  # a bad file is refused before any lock is taken
        with self.store.lock:
            with self.store.transaction() as tx:
                tx.own_lifecycle()
                registered = self.register(tx, data, round_id=round_id)
                if then is not None:
                    then(tx, registered.version)
            self.announce(registered, reason)
        return registered.version

    def register(self, tx: Writes, data: bytes | Callable[[int], bytes], *, round_id: int | None = None) -> Registered:
        """Inside a transaction holding the lifecycle lock: store the bytes of the next version (given,
        or made for its number) and register them. Announce it once the transaction has committed."""
        version = self.latest() + 1
        data = data(version) if callable(data) else data
        container = parse_model(data)
        if container.metadata.get("version") != version:
            data = with_version(container, version)
            container = parse_model(data)
        info = model_info(data, container)
        filename = self.files.write(tx, version, data)
        crash_point("before_register_model")
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
        return Registered(version, data, info)

    def announce(self, registered: Registered, reason: str) -> None:
        """After the registering transaction committed: log it and hand it to the evaluator."""
        info = registered.info
        log.info(
            "model v%d registered (%s, %d parameters, sha256 %s): %s",
            registered.version,
            info.architecture,
            info.num_parameters,
            info.sha256[:12],
            reason,
        )
        self.on_published(registered.version, registered.data)

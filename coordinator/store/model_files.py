"""Immutable, numbered model files, behind one small interface (`BlobStore`) with two homes:

- `ModelFiles`: files in a directory beside the SQLite database (the embedded default). A version's
  file is written atomically *inside* the transaction that registers it, before its row, so a
  registered version always has its whole file; a crash in between leaves an orphan file that
  startup removes (the round that produced it is still open and commits again).
- `DatabaseBlobs`: rows of `model_blobs` (PostgreSQL), so every replica serves the same versions with
  no shared filesystem; the blob is inserted by the registering transaction itself, so there are no
  orphans at all.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

from coordinator.store.database import is_url, models_dir_for
from coordinator.store.store import Store
from coordinator.store.writes import Writes
from engine.serialize.container import write_atomic

log = logging.getLogger("pocketfed.coordinator")


class BlobStore(ABC):
    """Where the bytes of registered model versions live; the database's model_versions is the registry."""

    @staticmethod
    def filename(version: int) -> str:
        return f"v{version:06d}.pfmodel"

    @abstractmethod
    def write(self, tx: Writes, version: int, data: bytes) -> str:
        """Store a version's bytes within the transaction that registers it; returns their name."""

    @abstractmethod
    def read(self, name: str) -> bytes:
        """A registered version's bytes (FileNotFoundError if they are missing)."""

    def remove_orphans(self, registered: set[str]) -> list[str]:
        """Startup: drop bytes no registered version points to (none can exist by default)."""
        return []


class ModelFiles(BlobStore):
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def write(self, tx: Writes | None, version: int, data: bytes) -> str:
        name = self.filename(version)
        write_atomic(self.directory / name, data)
        return name

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def remove_orphans(self, registered: set[str]) -> list[str]:
        """Delete files no registered version points to (half-finished commits, temp files)."""
        removed = []
        for path in self.directory.iterdir():
            if path.is_file() and path.name not in registered:
                path.unlink()
                removed.append(path.name)
        for name in removed:
            log.info("startup: removed unregistered model file %s", name)
        return removed


class DatabaseBlobs(BlobStore):
    def __init__(self, store: Store):
        self.store = store

    def write(self, tx: Writes, version: int, data: bytes) -> str:
        name = self.filename(version)
        tx.add_blob(name, data)
        return name

    def read(self, name: str) -> bytes:
        data = self.store.model_blob(name)
        if data is None:
            raise FileNotFoundError(f"model blob {name} is not in the database {self.store.label}")
        return data


def blob_store_for(db: str, store: Store) -> BlobStore:
    """A SQLite file's models live beside it; a PostgreSQL database holds its own."""
    return DatabaseBlobs(store) if is_url(db) else ModelFiles(models_dir_for(db))

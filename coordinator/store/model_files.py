"""Immutable, numbered model files on disk (the database holds their registry).

A version's file is written with write_atomic *before* the transaction that registers it,
so a registered version always has its whole file. A crash in between leaves an orphan file
that startup removes (the round that produced it is still open and commits again).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.serialize.container import write_atomic

log = logging.getLogger("pocketfed.coordinator")


class ModelFiles:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def filename(version: int) -> str:
        return f"v{version:06d}.pfmodel"

    def write(self, version: int, data: bytes) -> str:
        name = self.filename(version)
        write_atomic(self.directory / name, data)
        return name

    def read(self, filename: str) -> bytes:
        return (self.directory / filename).read_bytes()

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

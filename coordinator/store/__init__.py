"""Durable state: the database behind `Store` (every SQL statement, typed rows, migrations), the
immutable model files behind `BlobStore` (files beside SQLite, blobs in PostgreSQL), and the
advisory locks that let several coordinator replicas share one PostgreSQL database (locks.py)."""

from coordinator.store.database import describe, is_url, models_dir_for
from coordinator.store.model_files import BlobStore, DatabaseBlobs, ModelFiles, blob_store_for
from coordinator.store.rows import (
    DeviceRow,
    ModelVersionRow,
    NewRound,
    PartialRow,
    ReleaseRow,
    RoundRow,
    SecAggRow,
    UpdateRow,
)
from coordinator.store.store import Store
from coordinator.store.writes import StalePartial, Writes

__all__ = [
    "BlobStore",
    "DatabaseBlobs",
    "DeviceRow",
    "ModelFiles",
    "ModelVersionRow",
    "NewRound",
    "PartialRow",
    "ReleaseRow",
    "RoundRow",
    "SecAggRow",
    "StalePartial",
    "Store",
    "UpdateRow",
    "blob_store_for",
    "Writes",
    "describe",
    "is_url",
    "models_dir_for",
]

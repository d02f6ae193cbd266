"""Durable state: the database behind `Store` (every SQL statement, typed rows, migrations) and the
immutable model files (`ModelFiles`)."""

from coordinator.store.database import describe, is_url, models_dir_for
from coordinator.store.model_files import ModelFiles
from coordinator.store.rows import DeviceRow, ModelVersionRow, NewRound, RoundRow, UpdateRow
from coordinator.store.store import Store
from coordinator.store.writes import Writes

__all__ = [
    "DeviceRow",
    "ModelFiles",
    "ModelVersionRow",
    "NewRound",
    "RoundRow",
    "Store",
    "UpdateRow",
    "Writes",
    "describe",
    "is_url",
    "models_dir_for",
]

"""Durable state: the SQLite database (db.py) and the immutable model files (model_files.py)."""

from coordinator.storage.db import Database
from coordinator.storage.model_files import ModelFiles

__all__ = ["Database", "ModelFiles"]

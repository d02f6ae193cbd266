"""The SQLite database: schema, connection and transactions.

One connection, serialized by a lock: the coordinator's writes are short (one per accepted
update) and SQLite allows one writer anyway. WAL journal + synchronous=FULL, so a transaction
that returned is on disk and survives kill -9 (and power loss).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA_VERSION = 2
ADDED_COLUMNS = {"rounds": {"dp_clip": "REAL", "dp_q": "REAL", "dp_noise": "REAL", "epsilon": "REAL"}}

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id          TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,       -- sha256 of the bearer token (the token itself is never stored)
    name        TEXT,
    created_at  REAL NOT NULL,
    last_seen   REAL
);
CREATE TABLE IF NOT EXISTS model_versions (
    version         INTEGER PRIMARY KEY,
    sha256          TEXT NOT NULL,
    filename        TEXT NOT NULL,          -- relative to the models directory
    architecture    TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    num_parameters  INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    round_id        INTEGER,                -- the round that produced it (NULL for published models)
    accuracy        REAL,                   -- server-side evaluation, filled in after publication
    eval_loss       REAL,
    eval_n          INTEGER
);
CREATE TABLE IF NOT EXISTS rounds (
    id              INTEGER PRIMARY KEY,
    base_version    INTEGER NOT NULL REFERENCES model_versions(version),
    status          TEXT NOT NULL CHECK (status IN ('open', 'committed', 'abandoned')),
    config          TEXT NOT NULL,          -- JSON snapshot of RoundSettings at opening
    goal            INTEGER NOT NULL,
    max_assignments INTEGER NOT NULL,
    min_updates     INTEGER NOT NULL,
    opened_at       REAL NOT NULL,
    deadline        REAL NOT NULL,
    closed_at       REAL,
    reason          TEXT,
    received        INTEGER NOT NULL DEFAULT 0,
    total_weight    REAL NOT NULL DEFAULT 0,
    aggregate       BLOB,                   -- container: running weighted sum of deltas (float64)
    result_version  INTEGER,
    dp_clip         REAL,                   -- DP: clip norm C used by this round (NULL: DP off)
    dp_q            REAL,                   -- DP: sampling rate goal / population
    dp_noise        REAL,                   -- DP: noise multiplier z charged to the accountant
    epsilon         REAL                    -- DP: epsilon spent after this round committed
);
CREATE TABLE IF NOT EXISTS assignments (
    round_id     INTEGER NOT NULL REFERENCES rounds(id),
    device_id    TEXT NOT NULL REFERENCES devices(id),
    assigned_at  REAL NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS updates (
    round_id         INTEGER NOT NULL REFERENCES rounds(id),
    device_id        TEXT NOT NULL REFERENCES devices(id),
    idempotency_key  TEXT NOT NULL,
    sample_count     INTEGER NOT NULL,
    norm             REAL NOT NULL,
    encoding         TEXT NOT NULL,
    metrics          TEXT NOT NULL,         -- JSON
    received_at      REAL NOT NULL,
    response         TEXT NOT NULL,         -- JSON answer replayed for the same Idempotency-Key
    delta            BLOB,                  -- kept only for non-streaming (robust) strategies
    PRIMARY KEY (round_id, device_id),
    UNIQUE (device_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS server_state (
    key    TEXT PRIMARY KEY,
    value  BLOB NOT NULL
);
"""


class Database:
    """A locked SQLite connection with explicit transactions."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                    timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.transaction() as cur:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            for table, columns in ADDED_COLUMNS.items():  # a version-1 database gains the new columns
                present = {row["name"] for row in cur.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns.items():
                    if name not in present:
                        cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            cur.execute("INSERT OR REPLACE INTO server_state(key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),))

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Cursor]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (including a crash mid-way).

        durable=False skips the fsync (synchronous=NORMAL): still safe against kill -9 and in order
        with later durable commits, but power loss may drop it. For writes a device can redo
        (enrollment, check-in assignments); accepted updates and commits stay durable."""
        with self.lock:
            cur = self.conn.cursor()
            cur.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        with self.lock:
            return self.conn.execute(sql, params).fetchone()

    def close(self) -> None:
        with self.lock:
            self.conn.close()

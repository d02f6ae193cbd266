"""The SQLite database: schema, connection and transactions.

One writer connection, serialized by a lock (SQLite allows one writer anyway); accepted updates
reach it in groups through coordinator/ingest.py, so one fsync covers many. WAL journal +
synchronous=FULL, so a transaction that returned is on disk and survives kill -9 (and power loss).

Reads from a thread that does not hold the lock use that thread's own read-only connection: WAL
lets them see the last committed state while the writer commits, so authentication, check-in
pre-checks and status pages never queue behind an fsync. A thread holding the lock reads through
the writer connection and so sees its own transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
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


class OwnedLock:
    """A re-entrant lock that can tell whether the calling thread holds it (reads route on that)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = threading.local()

    def held(self) -> bool:
        return getattr(self._depth, "n", 0) > 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self._depth.n = getattr(self._depth, "n", 0) + 1
        return got

    def release(self) -> None:
        self._depth.n -= 1
        self._lock.release()

    def __enter__(self) -> OwnedLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Reader:
    """A thread's read-only connection, closed when the thread (and so its thread-local) goes away."""

    def __init__(self, path: Path):
        self.conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self.conn.row_factory = sqlite3.Row

    def __del__(self) -> None:
        self.conn.close()


class Database:
    """The locked writer connection with explicit transactions, plus per-thread read connections."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OwnedLock()
        self._readers = threading.local()
        self._reader_conns: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._closed = False
        self.conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0)
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
            cur.execute(
                "INSERT OR REPLACE INTO server_state(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

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

    def _reader(self) -> sqlite3.Connection | None:
        """This thread's read-only connection (None: use the writer's, under the lock)."""
        if self.lock.held() or self._closed:
            return None
        reader = getattr(self._readers, "reader", None)
        if reader is None:
            reader = self._readers.reader = _Reader(self.path)
            with self.lock:
                self._reader_conns.add(reader)
        return reader.conn

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        reader = self._reader()
        if reader is not None:
            return reader.execute(sql, params).fetchall()
        with self.lock:
            return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        """One row; the cursor is closed at once so no read snapshot stays open."""
        reader = self._reader()
        if reader is not None:
            cur = reader.execute(sql, params)
        else:
            with self.lock:
                return self.conn.execute(sql, params).fetchone()
        try:
            return cur.fetchone()
        finally:
            cur.close()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            for reader in list(self._reader_conns):
                reader.conn.close()
            self.conn.close()

"""Connections and transactions, on SQLite (the embedded default, `--db path`) or PostgreSQL
(`--db postgresql://...`, psycopg 3).

One writer connection, serialized by `lock` (SQLite allows one writer anyway); accepted updates
reach it in groups (service/writer.py), so one fsync covers many. A thread holding the lock reads
through the writer connection and so sees its own transaction; any other thread reads through a
connection of its own, which never waits for the writer's fsync.

SQLite: WAL journal; a durable transaction runs with synchronous=FULL (on disk when it returns,
through kill -9 and power loss), durable=False with NORMAL (safe against kill -9, in order with
later durable commits; power loss may drop it). Writes start with BEGIN IMMEDIATE, through
SQLAlchemy's documented pysqlite recipe (pysqlite's own BEGIN switched off, ours emitted from the
"begin" event). Reads use per-thread read-only connections in autocommit: WAL lets them see the
last committed state while the writer commits.

PostgreSQL: one writer connection per process too (its writer thread groups uploads as on
SQLite), while other processes -- replicas -- write through their own at the same time; the
advisory locks in locks.py and the database's constraints keep them apart. durable=False is
synchronous_commit=off for that transaction. Reads come from a small pool in autocommit
(psycopg 3 under SQLAlchemy's QueuePool; a connection the server dropped is replaced on the next
read, without a ping before every one). Every connection has TCP keepalives and server-side
timeouts, so a replica that vanished mid-transaction (power cut, kill -9) releases its locks.

Reads are on the hot path of every device call, so they skip SQLAlchemy's per-execution
machinery: each statement is compiled by SQLAlchemy once, for the dialect in use, and executed
on a DBAPI cursor (`fetch`). Writes go through SQLAlchemy Connections and their transactions.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool


def is_url(db: str) -> bool:
    return "://" in db


def describe(db: str) -> str:
    """`db` for messages and logs: a URL without its password."""
    return sa.make_url(db).render_as_string(hide_password=True) if is_url(db) else db


def models_dir_for(db: str) -> Path:
    """Where a SQLite database's model files live: beside it, in <db>.models (on PostgreSQL they are
    rows of model_blobs: store/blobs.py)."""
    if is_url(db):
        return Path(f"{sa.make_url(db).database or 'pocketfed'}.models")
    return Path(db).with_suffix(".models")


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


class _ThreadReader:
    """A thread's own SQLite read connection, closed when the thread (and so its thread-local) goes."""

    def __init__(self, path: Path):
        uri = f"{path.resolve().as_uri()}?mode=ro"
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)

    def close(self) -> None:
        self.conn.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown, or a connection already closed
            self.conn.close()


@dataclass(frozen=True)
class _Compiled:
    """A statement as SQLAlchemy compiled it for this dialect, ready for a DBAPI cursor."""

    sql: str
    order: tuple[str, ...] | None  # positional parameters (SQLite's "?"), else named ones
    defaults: dict[str, Any]  # the statement's own bound values (LIMIT 1, status = 'open')


def _sqlite_writer(path: Path) -> sa.Engine:
    def write_connection() -> sqlite3.Connection:
        # isolation_level=None: pysqlite emits no BEGIN of its own (SQLAlchemy's pysqlite recipe)
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
            conn.execute(f"PRAGMA {pragma}")
        return conn

    writer = sa.create_engine("sqlite://", creator=write_connection, poolclass=StaticPool)

    @event.listens_for(writer, "begin")
    def begin(conn: Connection) -> None:
        durable = conn.info.get("write")  # None: not a write transaction (nothing to begin)
        if durable is None:
            return
        level = "FULL" if durable else "NORMAL"
        if conn.info.get("synchronous") != level:
            conn.exec_driver_sql(f"PRAGMA synchronous={level}")
            conn.info["synchronous"] = level
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return writer


# libpq keepalives (a peer that vanished is noticed in ~10 s) and server-side limits: a lock wait or
# a transaction left idle by a stuck client ends instead of blocking every replica behind it.
PG_CONNECT_ARGS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "connect_timeout": 10,
    "options": "-c lock_timeout=60000 -c idle_in_transaction_session_timeout=120000",
}


def _postgresql_engines(url: sa.URL, readonly: bool, pool_size: int) -> tuple[sa.Engine | None, sa.Engine]:
    url = url.set(drivername="postgresql+psycopg")
    args = {**PG_CONNECT_ARGS, "application_name": "pocketfed"}
    if "options" in url.query:  # e.g. a population's search_path (service/populations.py): kept with ours
        args["options"] += " " + url.query["options"]
        url = url.difference_update_query(["options"])
    reader = sa.create_engine(
        url, isolation_level="AUTOCOMMIT", pool_size=pool_size, max_overflow=pool_size, connect_args=args
    )
    if readonly:
        return None, reader
    return sa.create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True, connect_args=args), reader


def _is_disconnect(exc: Exception, conn: Any) -> bool:
    """A lost connection (not a bad statement): psycopg marks the connection broken, or closed."""
    driver = conn.dbapi_connection
    return bool(getattr(driver, "broken", False) or getattr(driver, "closed", False))


class Database:
    """The locked writer connection with explicit transactions, plus read connections."""

    def __init__(self, db: str, *, readonly: bool = False, pool_size: int = 4):
        self.lock = OwnedLock()
        self._readers = threading.local()
        self._thread_readers: weakref.WeakSet[_ThreadReader] = weakref.WeakSet()
        self._readers_lock = threading.Lock()  # not `lock`: a new reader must not wait for the writer
        self._compiled: dict[sa.Executable, _Compiled] = {}
        self._in_write = False  # a write transaction is open (on the thread holding `lock`)
        self._closed = False
        self._reader_engine: sa.Engine | None = None
        writer: sa.Engine | None = None
        if is_url(db):
            url = sa.make_url(db)
            if url.get_backend_name() != "postgresql":
                raise ValueError(f"--db {db}: a URL must be postgresql://...; a path is a SQLite file")
            self.dialect, self.label = "postgresql", describe(db)
            writer, self._reader_engine = _postgresql_engines(url, readonly, pool_size)
            self._sa_dialect = self._reader_engine.dialect
        else:
            self.path = Path(db)
            if readonly and not self.path.is_file():
                raise FileNotFoundError(f"--db {db}: no such database file")
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                writer = _sqlite_writer(self.path)
            self.dialect, self.label = "sqlite", str(self.path)
            self._sa_dialect = sqlite.dialect()
        self._writer_engine = writer
        self._writer: Connection | None = writer.connect() if writer is not None else None
        # several processes may write this database at once (replicas): locks.py's locks mean something
        self.shared = self.dialect == "postgresql"

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Connection]:
        """One write transaction (BEGIN IMMEDIATE on SQLite): COMMIT, or ROLLBACK on any exception.

        durable=False: for writes a device can redo (enrollment, check-in assignments); accepted
        updates and commits stay durable."""
        if self._writer is None:
            raise RuntimeError("the store is open read-only")
        with self.lock:
            conn = self._writer
            if conn.in_transaction():
                raise RuntimeError("a write transaction is already open on this connection")
            conn.info["write"] = durable
            try:
                with conn.begin():
                    self._in_write = True
                    if self.dialect == "postgresql" and not durable:
                        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
                    yield conn
            finally:
                self._in_write = False
                conn.info.pop("write", None)

    def fetch(self, statement: sa.Executable, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """Run a read on a DBAPI cursor: the writer's inside this thread's write transaction (to see
        its own writes), else this thread's read connection (committed state, never waiting)."""
        compiled = self._compiled.get(statement) or self._compile(statement)
        values = {**compiled.defaults, **params} if params else compiled.defaults
        args = values if compiled.order is None else tuple(values[name] for name in compiled.order)
        if self._in_write and self.lock.held():
            return self._run(self._writer.connection.dbapi_connection, compiled.sql, args)
        if self._closed:
            raise RuntimeError("the store is closed")
        if self.dialect == "sqlite":
            return self._run(self._thread_reader(), compiled.sql, args)
        return self._pooled(compiled.sql, args)

    def execute_now(self, statement: sa.Executable, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """One write statement on its own, atomic by itself (an upsert with RETURNING: a lease, a
        rate-limit hit): on PostgreSQL in autocommit on a pooled connection, never waiting for this
        process's writer; on SQLite a non-durable write transaction."""
        if self.dialect == "sqlite":
            with self.transaction(durable=False) as conn:
                result = conn.execute(statement, params or {})
                return [tuple(r) for r in result] if result.returns_rows else []
        compiled = self._compiled.get(statement) or self._compile(statement)
        return self._pooled(compiled.sql, {**compiled.defaults, **(params or {})})

    def _pooled(self, sql: str, args: Any) -> list[tuple]:
        """Run on a pooled PostgreSQL connection (autocommit); a connection the server closed since its
        last use (a restart, an idle timeout) is thrown away and the statement runs once more."""
        for attempt in (1, 2):
            conn = self._reader_engine.raw_connection()
            try:
                return self._run(conn, sql, args)
            except Exception as exc:
                if attempt == 2 or not _is_disconnect(exc, conn):
                    raise
                conn.invalidate()
            finally:
                conn.close()
        raise AssertionError("unreachable")

    @staticmethod
    def _run(dbapi_connection: Any, sql: str, args: Any) -> list[tuple]:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql, args)
            return cursor.fetchall() if cursor.description is not None else []
        finally:
            cursor.close()

    def _compile(self, statement: sa.Executable) -> _Compiled:
        compiled = statement.compile(dialect=self._sa_dialect)
        order = tuple(compiled.positiontup) if compiled.positional else None
        entry = _Compiled(str(compiled), order, compiled.construct_params(_check=False))
        self._compiled[statement] = entry
        return entry

    def _thread_reader(self) -> sqlite3.Connection:
        reader = getattr(self._readers, "reader", None)
        if reader is None:
            reader = self._readers.reader = _ThreadReader(self.path)
            with self._readers_lock:
                self._thread_readers.add(reader)
        return reader.conn

    def close(self) -> None:
        with self.lock, self._readers_lock:
            self._closed = True
            for reader in list(self._thread_readers):
                reader.close()
            if self._writer is not None:
                self._writer.close()
                self._writer_engine.dispose()
            if self._reader_engine is not None:
                self._reader_engine.dispose()

"""PostgreSQL advisory locks: how replicas on one database keep out of each other's way.

All are transaction-level (`pg_advisory_xact_*`): released at COMMIT or ROLLBACK, and by the server
when a replica's connection dies (kill -9 included), so a dead replica never holds one. PostgreSQL
queues lock requests fairly: once a commit waits for a round's exclusive lock, new shared requests
queue behind it instead of starving it.

- `migrations`: Alembic's upgrade at startup, so replicas starting together migrate once;
- `lifecycle`: every change of which round is open and which model versions exist (open, commit,
  abandon, publish, round settings), so those happen once whichever replica attempts them;
- `round(id)`: shared by each transaction that acknowledges uploads to the round (many replicas at
  once), exclusive for its commit or abandonment, which so waits for acknowledgements in flight and
  makes later ones find the round closed.

On SQLite (one process, one writer) these are no-ops: the store's lock and BEGIN IMMEDIATE already
serialize every write.
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

SPACE = 0x5046  # "PF": the first key of the two-key form, so other applications' locks never collide
LIFECYCLE, MIGRATIONS = 1, 2
ROUNDS = SPACE + 1  # (ROUNDS, round id)


def _lock(conn: Connection, key: tuple[int, int], shared: bool = False) -> None:
    if conn.dialect.name != "postgresql":
        return
    function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    conn.exec_driver_sql(f"SELECT {function}(%(a)s, %(b)s)", {"a": key[0], "b": key[1]})


def migrations(conn: Connection) -> None:
    _lock(conn, (SPACE, MIGRATIONS))


def lifecycle(conn: Connection) -> None:
    _lock(conn, (SPACE, LIFECYCLE))


def round_exclusive(conn: Connection, round_id: int) -> None:
    _lock(conn, (ROUNDS, round_id))


def round_shared(conn: Connection, round_id: int) -> None:
    _lock(conn, (ROUNDS, round_id), shared=True)

"""Versioned schema migrations (Alembic, migrations/), applied at startup inside one write transaction.

A database made before migrations existed has no alembic_version table; its server_state row
'schema_version' says what it holds. Version 2 is exactly revision 0001's schema and is stamped as
it is; version 1 lacked the four DP columns of `rounds`, which are added first. Anything else is
refused rather than guessed at. A database already at HEAD is recognised without loading Alembic.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from coordinator.store import locks
from coordinator.store.schema import Real, server_state

MIGRATIONS = Path(__file__).with_name("migrations")
INITIAL = "0001"
HEAD = "0007_issue17_fedmetrics"  # the newest revision in migrations/versions (tests/test_store_migrations.py checks)
LEGACY_V1_COLUMNS = ("dp_clip", "dp_q", "dp_noise", "epsilon")  # added by schema version 2
ALEMBIC_VERSION = sa.table("alembic_version", sa.column("version_num"))


def current_revision(conn: Connection) -> str | None:
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(sa.select(ALEMBIC_VERSION.c.version_num)).scalar()


def _config(conn: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _adopt_legacy(conn: Connection, config) -> None:
    """Stamp a pre-migration database with the revision its schema already matches."""
    from alembic import command
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    value = conn.execute(sa.select(server_state.c.value).where(server_state.c.key == "schema_version")).scalar()
    version = value.decode() if isinstance(value, bytes) else value
    if version == "1":
        ops = Operations(MigrationContext.configure(conn))
        present = {c["name"] for c in sa.inspect(conn).get_columns("rounds")}
        for name in LEGACY_V1_COLUMNS:
            if name not in present:
                ops.add_column("rounds", sa.Column(name, Real))
    elif version != "2":
        raise ValueError(f"database schema_version {version!r} is not one this coordinator knows (1 or 2)")
    command.stamp(config, INITIAL)


def upgrade(conn: Connection) -> str:
    """Bring the schema to HEAD on `conn` (inside the caller's transaction); returns the revision.
    On PostgreSQL an advisory lock makes replicas that start together migrate one after another: the
    first upgrades, the others then find HEAD."""
    locks.migrations(conn)
    current = current_revision(conn)
    if current == HEAD:
        return HEAD
    from alembic import command

    config = _config(conn)
    if current is None and sa.inspect(conn).has_table("rounds"):
        _adopt_legacy(conn, config)
    command.upgrade(config, "head")
    return current_revision(conn)

"""PostgreSQL for the tests: the local server (127.0.0.1:5432, user postgres, trust auth) and a
throwaway database per test or per run, dropped afterwards.

A test that needs the server and finds none skips, saying why -- except in CI (CI=1, which .ci/run
exports after making sure the server is up), where a missing server is a failure, not a skip.
"""

from __future__ import annotations

import os
import secrets

import pytest

SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def no_server(reason: str) -> None:
    message = f"no PostgreSQL server at 127.0.0.1:5432 (user postgres, trust auth): {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " -- CI=1, so this fails instead of skipping", pytrace=False)
    pytest.skip(message)


class Databases:
    """CREATE DATABASE pf_test_<random> on the local server, and DROP DATABASE when done."""

    def __init__(self, server: str = SERVER):
        pytest.importorskip("psycopg", reason="psycopg (the coordinator extra) is not installed")
        import sqlalchemy as sa

        self.engine = sa.create_engine(server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            no_server(str(exc.orig).strip())

    def create(self) -> str:
        name = f"pf_test_{secrets.token_hex(6)}"
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:5432/{name}"

    def drop(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(scope="session")
def pg_databases():
    databases = Databases()
    yield databases
    databases.close()


@pytest.fixture(scope="session")
def pg_database(pg_databases):
    """One database for the whole run (tests empty it as they need)."""
    url = pg_databases.create()
    yield url
    pg_databases.drop(url)


@pytest.fixture
def pg_url(pg_databases):
    """A fresh, empty database for this test."""
    url = pg_databases.create()
    yield url
    pg_databases.drop(url)

"""A database made before migrations existed (schema version 2, and the older version 1) is
adopted by the Alembic-managed store: stamped, extended where it lacked columns, and the
coordinator carries on with its open round as if it had never stopped."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import RoundSettings, Settings
from coordinator.store import Store
from coordinator.store.migrate import HEAD
from coordinator.strategies import RunningSum
from coordinator.testing import FakeClock, ServerThread, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update

SHAPES = {"w": (4, 3), "b": (3,)}

# coordinator/storage/db.py's SCHEMA as it stood before migrations (schema_version 2)
OLD_SCHEMA = """
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
DP_COLUMNS = ("dp_clip", "dp_q", "dp_noise", "epsilon")  # what schema version 1 did not have yet


def old_database(tmp_path, clock: FakeClock, schema_version: str = "2"):
    """What the pre-migration coordinator left: v0, devices a and b assigned to open round 1, a's
    update counted in the round's running sum; returns (db path, a's delta, base weights)."""
    db = tmp_path / "c.db"
    schema = OLD_SCHEMA
    if schema_version == "1":
        for name in DP_COLUMNS:
            schema = schema.replace(f",\n    {name} ", f",\n    --{name} ").replace(f"    {name} ", f"    --{name} ")
        schema = schema.replace("result_version  INTEGER,", "result_version  INTEGER")
    model = stand_in_model_bytes(seed=4, shapes=SHAPES)
    (tmp_path / "c.models").mkdir()
    (tmp_path / "c.models" / "v000000.pfmodel").write_bytes(model)
    delta_a = random_delta(SHAPES, seed=1, scale=0.1)
    running = RunningSum()
    running.add(delta_a, 5)
    config = RoundSettings(goal=2, min_devices=1, over_select=1.5, deadline=600, min_fraction=0.5).model_dump(
        mode="json"
    )
    config = {k: v for k, v in config.items() if schema_version == "2" or not k.startswith("dp_")}
    config = {k: v for k, v in config.items() if not k.startswith("influence_")}  # newer than these schemas
    conn = sqlite3.connect(db)
    conn.executescript(schema)
    now = clock()
    with conn:
        conn.execute("INSERT INTO server_state VALUES ('schema_version', ?)", (schema_version,))
        conn.execute("INSERT INTO server_state VALUES ('paused', '0')")
        conn.execute(
            "INSERT INTO model_versions(version, sha256, filename, architecture, size_bytes, num_parameters, "
            "created_at) VALUES (0, ?, 'v000000.pfmodel', 'lenet-standin', ?, 15, '2024-01-01T00:00:00+00:00')",
            (hashlib.sha256(model).hexdigest(), len(model)),
        )
        for name in "ab":
            token_hash = hashlib.sha256(f"token-{name}".encode()).hexdigest()
            conn.execute("INSERT INTO devices VALUES (?, ?, ?, ?, NULL)", (f"dev-{name}", token_hash, name, now))
            conn.execute("INSERT INTO assignments VALUES (1, ?, ?)", (f"dev-{name}", now))
        conn.execute(
            "INSERT INTO rounds(id, base_version, status, config, goal, max_assignments, min_updates, opened_at, "
            "deadline, received, total_weight, aggregate) VALUES (1, 0, 'open', ?, 2, 3, 1, ?, ?, 1, 5, ?)",
            (json.dumps(config), now, now + 600, running.to_bytes()),
        )
        answer = {"accepted": True, "round_id": 1, "received": 1, "goal": 2}
        conn.execute(
            "INSERT INTO updates VALUES (1, 'dev-a', 'key-a', 5, 1.0, 'float32', '{}', ?, ?, NULL)",
            (now, json.dumps(answer)),
        )
    conn.close()
    return db, delta_a, loads(model).tensors


def columns(db, table: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


@pytest.mark.parametrize("schema_version", ["2", "1"])
def test_a_pre_migration_database_is_adopted_and_its_open_round_goes_on(tmp_path, schema_version):
    clock = FakeClock()
    db, delta_a, base = old_database(tmp_path, clock, schema_version)
    before = columns(db, "rounds")
    assert ("dp_clip" in before) == (schema_version == "2")
    settings = Settings(db=str(db), model="unused-model-name", enrollment_key="k", goal=2, min_devices=1)
    app = create_app(settings, clock=clock)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        r1 = client.get("/v1/rounds/1").json()
        assert (r1["status"], r1["received"], r1["total_samples"], r1["goal"]) == ("open", 1, 5.0, 2)
        headers_a = {"Authorization": "Bearer token-a", "Idempotency-Key": "key-a"}
        replay = client.post("/v1/rounds/1/updates", content=b"ignored", headers=headers_a)
        assert replay.status_code == 202 and replay.json()["received"] == 1  # the old row's answer, replayed
        delta_b = random_delta(SHAPES, seed=2, scale=0.1)
        body = encode_update(delta_b, sample_count=15, round_id=1, base_version=0)
        headers_b = {"Authorization": "Bearer token-b", "Idempotency-Key": "key-b"}
        answer = client.post("/v1/rounds/1/updates", content=body, headers=headers_b)
        assert answer.status_code == 202 and answer.json()["received"] == 2
        assert client.get("/v1/rounds/1").json()["status"] == "committed"
        v1 = loads(client.get("/v1/models/1", headers=headers_b).content).tensors
        for name in SHAPES:  # the old running sum and the new update, FedAvg-weighted 5 : 15
            mean = (5 * delta_a[name].astype(np.float64) + 15 * delta_b[name].astype(np.float64)) / 20
            np.testing.assert_allclose(v1[name], base[name] + mean, atol=1e-6, err_msg=name)
        assert client.get("/healthz").json() == {"status": "ok", "model_version": 1, "round_id": 2, "paused": False}
    assert columns(db, "rounds") == before + ([] if schema_version == "2" else list(DP_COLUMNS)) + ["canary"]
    store = Store(str(db))  # opening it again changes nothing
    try:
        assert store.revision == HEAD
        assert dict(store.state_items())["schema_version"] == schema_version.encode()
    finally:
        store.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]


def test_an_unknown_schema_version_is_refused_with_a_reason(tmp_path):
    db, _, _ = old_database(tmp_path, FakeClock())
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE server_state SET value='7' WHERE key='schema_version'")
    with pytest.raises(ValueError, match="schema_version '7'"):
        Store(str(db))
    with sqlite3.connect(db) as conn:  # and nothing was half-done
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name='alembic_version'").fetchall()


def test_a_fresh_database_gets_the_schema_an_old_one_has(tmp_path):
    """Created by the migrations, the tables and their SQLite column types are those of the old schema
    (primary keys are NOT NULL now, which SQLite's old TEXT PRIMARY KEY did not enforce), with later
    revisions' columns after them (updates.replica: which replica acknowledged it; rounds.canary)."""
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        conn.executescript(OLD_SCHEMA)
    Store(str(tmp_path / "new.db")).close()
    added = {"updates": [("replica", "TEXT", 0, 0)], "rounds": [("canary", "INTEGER", 1, 0)]}
    for table in ("devices", "model_versions", "rounds", "assignments", "updates", "server_state"):
        with sqlite3.connect(old) as a, sqlite3.connect(tmp_path / "new.db") as b:
            info = 'SELECT name, type, "notnull" OR pk > 0, pk FROM pragma_table_info(?)'
            want = a.execute(info, (table,)).fetchall() + added.get(table, [])
            assert b.execute(info, (table,)).fetchall() == want, table


def test_head_is_the_newest_revision_alembic_knows():
    """The store skips loading Alembic for a database at HEAD, so HEAD must be the scripts' head."""
    from alembic.script import ScriptDirectory

    from coordinator.store.migrate import HEAD, MIGRATIONS

    assert ScriptDirectory(str(MIGRATIONS)).get_current_head() == HEAD

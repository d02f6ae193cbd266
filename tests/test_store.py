"""The store on both backends it supports: the same code and the same answers on SQLite (the
embedded default) and PostgreSQL (127.0.0.1:5432, user postgres, a throwaway database per run),
plus the SQLite guarantees the coordinator's durability rests on."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from coordinator.api import create_app
from coordinator.settings import RoundSettings, Settings
from coordinator.store import NewRound, StalePartial, Store, UpdateRow
from coordinator.store.migrate import HEAD
from coordinator.strategies import RunningSum
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update
from simulation.processes import free_port

pytest_plugins = ["postgres_helpers"]  # pg_url, pg_database: throwaway PostgreSQL databases


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A store location with nothing in it yet: a SQLite file, or the run's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    url = request.getfixturevalue("pg_database")
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return url


@pytest.fixture
def store(db_url):
    s = Store(db_url)
    yield s
    s.close()


def new_round(goal: int = 2, opened_at: float = 100.0, **dp) -> NewRound:
    cfg = RoundSettings(goal=goal, min_devices=1, strategy="fedavgm", server_momentum=0.5)
    return NewRound(0, cfg, goal, goal + 1, 1, opened_at, opened_at + 60, **dp)


def add_version(tx, version: int, round_id: int | None = None) -> None:
    tx.add_version(
        version,
        sha256=f"{version:064d}",
        filename=f"v{version:06d}.pfmodel",
        architecture="lenet",
        size_bytes=3_000_000_000,  # past 2**31: a 64-bit column on both backends
        num_parameters=44_426,
        created_at="2024-01-01T00:00:00+00:00",
        round_id=round_id,
    )


def test_migrations_create_the_schema_once(db_url):
    first = Store(db_url)
    assert first.revision == HEAD and first.latest_version() == -1 and first.open_round() is None
    first.close()
    again = Store(db_url)  # idempotent: nothing to do the second time
    assert again.revision == HEAD
    again.close()


def test_devices(store):
    with store.transaction(durable=False) as tx:
        tx.add_device("d1", "hash-1", "phone", 10.0)
        tx.add_device("d2", "hash-2", None, 11.0)
    d1 = store.device_by_token("hash-1")
    assert (d1.id, d1.name, d1.created_at, d1.last_seen) == ("d1", "phone", 10.0, None)
    assert store.device_by_token("nope") is None and store.count_devices() == 2
    with store.transaction(durable=False) as tx:
        tx.touch_devices([("d1", 42.5), ("d2", 43.0)])
    assert store.device_by_token("hash-1").last_seen == 42.5
    assert store.device_tokens() == {"d1": "hash-1", "d2": "hash-2"}
    with pytest.raises(sa.exc.IntegrityError), store.transaction() as tx:  # a token is unique
        tx.add_device("d3", "hash-3", None, 12.0)
        tx.add_device("d4", "hash-1", None, 12.0)
    assert store.count_devices() == 2  # the failed transaction left nothing, d3 included


def test_versions_and_evaluation(store):
    with store.transaction() as tx:
        for v in range(3):
            add_version(tx, v, round_id=v or None)
    assert store.latest_version() == 2
    assert [v.version for v in store.versions(2)] == [2, 1]
    assert [v.version for v in store.versions()] == [0, 1, 2]
    assert store.version(1).size_bytes == 3_000_000_000 and store.version(0).round_id is None
    assert store.version_filenames() == {"v000000.pfmodel", "v000001.pfmodel", "v000002.pfmodel"}
    assert store.unevaluated_versions() == [0, 1, 2] and store.latest_accuracy() is None
    with store.transaction() as tx:
        tx.set_evaluation(1, 0.75, 0.5, 1000)
    assert (store.version(1).accuracy, store.version(1).eval_loss, store.version(1).eval_n) == (0.75, 0.5, 1000)
    assert store.unevaluated_versions() == [0, 2] and store.latest_accuracy() == 0.75


def test_rounds_assignments_and_updates(store):
    delta = random_delta({"w": (3, 2)}, seed=1)
    running = RunningSum()
    running.add(delta, 4)
    with store.transaction() as tx:
        add_version(tx, 0)
        tx.add_device("d1", "h1", None, 1.0)
        tx.add_device("d2", "h2", None, 1.0)
        round_id = tx.open_round(new_round())
        tx.add_assignment(round_id, "d1", 101.0)
        tx.add_assignment(round_id, "d2", 102.0)
        answer = {"accepted": True, "round_id": round_id, "received": 1, "goal": 2}
        tx.add_update(UpdateRow(round_id, "d1", "k1", 4, 2.5, "int8", {"loss": 0.5}, 103.0, answer, b"blob"))
        tx.fold_into_round(round_id, added=1, samples=4.0, aggregate=running.to_bytes())
    r = store.open_round()
    assert (r.id, r.status, r.received, r.total_weight, r.goal, r.max_assignments) == (round_id, "open", 1, 4.0, 2, 3)
    assert r.config.strategy == "fedavgm" and r.config.server_momentum == 0.5  # parsed once, typed
    assert r.aggregate is None  # only when asked for
    stored = RunningSum.from_bytes(store.round(round_id, with_aggregate=True).aggregate)
    np.testing.assert_array_equal(stored.sums["w"], running.sums["w"])
    assert store.is_assigned(round_id, "d1") and not store.is_assigned(round_id, "d3")
    assert store.count_assigned(round_id) == 2 and store.assigned_per_round([round_id, 99]) == {round_id: 2}
    assert store.answer_for_key("d1", "k1") == answer and store.answer_for_key("d1", "k2") is None
    assert store.has_update(round_id, "d1") and not store.has_update(round_id, "d2")
    (update,) = store.round_updates(round_id)
    assert (update.metrics, update.response, update.encoding, update.delta) == ({"loss": 0.5}, answer, "int8", None)
    assert store.round_deltas(round_id) == [(b"blob", 4)] and store.round_norms(round_id) == [2.5]
    assert [u.idempotency_key for u in store.updates_in_acceptance_order()] == ["k1"]
    with store.transaction() as tx:
        tx.fold_into_round(round_id, added=1, samples=6.0, aggregate=None)  # counts only: the blob stays
        tx.commit_round(round_id, closed_at=150.0, reason="goal reached", result_version=0)
        second = tx.open_round(new_round(opened_at=200.0, dp_clip=0.5, dp_q=0.1, dp_noise=1.1))
        tx.set_epsilon(round_id, 0.25)
    done = store.round(round_id, with_aggregate=True)
    assert (done.status, done.received, done.total_weight, done.result_version) == ("committed", 2, 10.0, 0)
    assert done.aggregate == running.to_bytes() and store.count_updates() == 1
    assert store.open_round().id == second and store.last_epsilon() == (0.25, None)
    with store.transaction() as tx:
        tx.abandon_round(second, closed_at=260.0, reason="deadline")
    assert store.rounds_by_status() == {"committed": 1, "abandoned": 1} and store.open_round() is None
    assert [r.id for r in store.rounds(10)] == [second, round_id]
    assert store.round(second).aggregate is None and store.dp_events() == []


def test_server_state_upserts(store):
    with store.transaction() as tx:
        tx.set_state("paused", "1")
        tx.set_state("blob", b"\x00\xff")
        tx.add_state_if_missing("seed", "123")
    with store.transaction() as tx:
        tx.set_state("paused", "0")
        tx.add_state_if_missing("seed", "456")  # kept: the first value stays
    assert store.state("paused") == b"0" and store.state("seed") == b"123" and store.state("blob") == b"\x00\xff"
    assert store.state("missing") is None
    assert store.state_items() == [("blob", b"\x00\xff"), ("paused", b"0"), ("seed", b"123")]


def test_reads_see_committed_state_and_never_wait_for_the_writer(store):
    with store.transaction() as tx:
        tx.add_device("d1", "h1", None, 1.0)
    seen, inside = {}, threading.Event()
    release = threading.Event()

    def writer():
        with store.transaction() as tx:
            tx.add_device("d2", "h2", None, 2.0)
            assert store.count_devices() == 2  # the writer's own thread sees its transaction
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    reader = threading.Thread(target=lambda: seen.update(n=store.count_devices()))
    reader.start()
    reader.join(5)  # while the write transaction is still open
    assert not reader.is_alive() and seen["n"] == 1
    release.set()
    thread.join(10)
    assert store.count_devices() == 2


def test_sqlite_durability_settings(tmp_path):
    """WAL; synchronous=FULL in durable transactions and NORMAL otherwise; BEGIN IMMEDIATE takes the
    write lock at once, before the first write."""
    store = Store(str(tmp_path / "s.db"))
    try:
        with store.transaction() as tx:
            assert tx.conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert tx.conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            other = sqlite3.connect(tmp_path / "s.db", timeout=0)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
        with store.transaction(durable=False) as tx:
            assert tx.conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        with store.transaction() as tx:
            assert tx.conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    finally:
        store.close()


def test_a_coordinator_runs_a_round_on_this_backend(db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a PostgreSQL URL keeps model files in <database>.models here
    shapes = {"w": (5, 4), "b": (4,)}
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=1, shapes=shapes))
    settings = Settings(
        db=db_url, model=str(model), enrollment_key="k", goal=2, min_devices=1, deadline=600, influence_bound=False
    )
    deltas = [random_delta(shapes, seed=i, scale=0.1) for i in range(2)]
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        devices = [TestDevice(client, "k") for _ in range(2)]
        for device, delta, n in zip(devices, deltas, (3, 9), strict=True):
            task = device.task()
            assert device.upload(1, encode_update(delta, sample_count=n, round_id=1, base_version=0)).status_code == 202
            assert task["round_id"] == 1
        assert client.get("/v1/rounds/1").json()["status"] == "committed"
        v1 = loads(client.get("/v1/models/1", headers=devices[0].headers).content).tensors
    base = loads(model.read_bytes()).tensors
    for name in shapes:
        mean = (3 * deltas[0][name].astype(np.float64) + 9 * deltas[1][name].astype(np.float64)) / 12
        np.testing.assert_allclose(v1[name], base[name] + mean, atol=1e-6)
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").json()["round_id"] == 2  # restarted on the same database
        assert [v["version"] for v in client.get("/v1/models").json()] == [1, 0]


def test_partial_aggregates_fold_only_from_the_count_last_seen(store):
    """Each replica's partial grows from the count it last wrote; a stale view (another process wrote
    the row since) writes nothing. The round's count while open is its row's plus its partials'."""
    with store.transaction() as tx:
        add_version(tx, 0)
        round_id = tx.open_round(new_round(goal=5))
        tx.fold_into_partial(round_id, "a", expected=None, added=2, samples=6.0, aggregate=b"a2")
        tx.fold_into_partial(round_id, "b", expected=None, added=1, samples=4.0, aggregate=b"b1")
    with pytest.raises(StalePartial), store.transaction() as tx:
        tx.fold_into_partial(round_id, "a", expected=1, added=1, samples=1.0, aggregate=b"stale")
    with pytest.raises(StalePartial), store.transaction() as tx:  # "a" has a row: not a first fold
        tx.fold_into_partial(round_id, "a", expected=None, added=1, samples=1.0, aggregate=b"stale")
    with store.transaction() as tx:
        tx.fold_into_partial(round_id, "a", expected=2, added=1, samples=2.0, aggregate=b"a3")
    assert (store.partial_count(round_id, "a"), store.partial_aggregate(round_id, "a")) == (3, b"a3")
    assert store.partial_count(round_id, "c") is None
    r = store.open_round()
    assert (r.received, r.total_weight) == (4, 12.0)
    assert [(p.replica, p.received, p.total_weight, p.aggregate) for p in store.round_partials(round_id)] == [
        ("a", 3, 8.0, b"a3"),
        ("b", 1, 4.0, b"b1"),
    ]
    with store.transaction() as tx:  # closing merges the partials into the row; they keep their counts
        tx.commit_round(round_id, closed_at=150.0, reason="goal reached", result_version=0)
        tx.merge_partials(round_id, received=4, total_weight=12.0, aggregate=b"sum")
    done = store.round(round_id, with_aggregate=True)
    assert (done.received, done.total_weight, done.aggregate) == (4, 12.0, b"sum")  # not counted twice
    assert [(p.replica, p.received, p.aggregate) for p in store.round_partials(round_id)] == [
        ("a", 3, None),
        ("b", 1, None),
    ]
    assert [(p.round_id, p.replica, p.received) for p in store.partials()] == [(round_id, "a", 3), (round_id, "b", 1)]


def test_one_open_round_blobs_leases_and_counters(store):
    with store.transaction() as tx:
        add_version(tx, 0)
        tx.open_round(new_round())
        tx.add_blob("v000000.pfmodel", b"\x00model")
    with pytest.raises(sa.exc.IntegrityError), store.transaction() as tx:
        tx.open_round(new_round())  # a second open round: refused by the database itself
    assert store.model_blob("v000000.pfmodel") == b"\x00model" and store.model_blob("nope") is None
    assert store.model_blob_names() == {"v000000.pfmodel"}
    assert store.try_lease("work", "a", 30) and store.try_lease("work", "a", 30)  # taken, then renewed
    assert not store.try_lease("work", "b", 30) and store.lease_holder("work") == "a"
    store.release_lease("work", "a")
    assert store.lease_holder("work") is None and store.try_lease("work", "b", 0.2)
    time.sleep(0.3)  # b did not renew: expired
    assert store.lease_holder("work") is None and store.try_lease("work", "a", 30)
    assert [store.hit("enroll:1.2.3.4", 60, 1000.0) for _ in range(3)] == [1, 2, 3]
    assert store.hit("enroll:1.2.3.4", 60, 1080.0) == 1  # the next window
    assert store.hit("enroll:5.6.7.8", 60, 1000.0) == 1
    store.prune_rate_limits(before=1020.0)  # forgets the windows starting at 960, keeps 1080's
    assert store.hit("enroll:1.2.3.4", 60, 1000.0) == 1 and store.hit("enroll:1.2.3.4", 60, 1080.0) == 2


def test_a_missing_server_skips_outside_ci_and_fails_in_ci(monkeypatch):
    from postgres_helpers import Databases

    nowhere = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL server"):
        Databases(nowhere)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI=1, so this fails instead of skipping"):
        Databases(nowhere)

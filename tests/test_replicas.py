"""Coordinator replicas on one PostgreSQL database act as one service: a device may use a different
replica for every call; a round commits exactly once, summing every replica's partial aggregate;
replicas that start together migrate once; kill -9 any replica -- between acknowledging and
committing, or in the middle of a commit -- and nothing acknowledged is lost or counted twice."""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from coordinator.api import create_app
from coordinator.audit import audit
from coordinator.settings import Settings
from coordinator.store import Store
from coordinator.store.migrate import HEAD
from coordinator.testing import FakeClock, ServerThread, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update
from simulation.processes import CoordinatorProcess

pytest_plugins = ["postgres_helpers"]  # pg_url, pg_database: throwaway PostgreSQL databases

KEY = "replica-enrollment-key-k7Qx9Lm2Pw4Z"
SHAPES = {"w": (6, 4), "b": (4,)}


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "base.pfmodel"
    path.write_bytes(stand_in_model_bytes(seed=7, shapes=SHAPES))
    return path


def body(seed: int, samples: int, round_id: int = 1, base_version: int = 0) -> bytes:
    delta = random_delta(SHAPES, seed, scale=0.1)
    return encode_update(delta, sample_count=samples, round_id=round_id, base_version=base_version)


def fedavg(base: dict, seeds_and_samples: list[tuple[int, int]]) -> dict:
    total = sum(n for _, n in seeds_and_samples)
    return {
        name: base[name]
        + sum(n * random_delta(SHAPES, seed, scale=0.1)[name].astype(np.float64) for seed, n in seeds_and_samples)
        / total
        for name in SHAPES
    }


@contextlib.contextmanager
def replicas(url: str, model: Path, n: int, clock=None, **options):
    """`n` replicas in this process, each with its own store, writer and lifecycle, on real ports;
    yields an httpx client per replica."""
    settings = Settings(
        db=url,
        model=str(model),
        enrollment_key=KEY,
        **{"goal": 2, "min_devices": 1, "deadline": 3600, "influence_bound": False, **options},
    )
    with contextlib.ExitStack() as stack:
        clients = []
        for _ in range(n):
            app = create_app(settings, **({"clock": clock} if clock else {}))
            server = stack.enter_context(ServerThread(app))
            client = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
            client.services = app.state.services
            clients.append(client)
        yield clients


def enroll(client: httpx.Client) -> dict[str, str]:
    answer = client.post("/v1/devices", json={"enrollment_key": KEY})
    assert answer.status_code == 201, answer.text
    return {"Authorization": f"Bearer {answer.json()['token']}"}


def checkin(client: httpx.Client, headers: dict) -> dict:
    answer = client.post("/v1/checkin", json={"eligible": True}, headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


def upload(client: httpx.Client, headers: dict, data: bytes, key: str, round_id: int = 1) -> httpx.Response:
    headers = {**headers, "Idempotency-Key": key, "Content-Type": "application/octet-stream"}
    return client.post(f"/v1/rounds/{round_id}/updates", content=data, headers=headers)


def execute(url: str, sql: str) -> list[tuple]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.begin() as conn:
            result = conn.exec_driver_sql(sql)
            return [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()


def test_a_device_uses_four_replicas_as_one_service(pg_url, model):
    """Enroll on one replica, check in on a second, download from a third, upload to a fourth; the
    retry of an acknowledged upload on yet another replica answers as the first did."""
    base = loads(model.read_bytes()).tensors
    with replicas(pg_url, model, 4) as (a, b, c, d):
        first = enroll(a)
        task = checkin(b, first)
        assert task["status"] == "task" and (task["task"]["round_id"], task["task"]["base_version"]) == (1, 0)
        v0 = c.get("/v1/models/0", headers=first)
        assert v0.status_code == 200 and v0.headers["ETag"].strip('"') == d.get("/v1/models/latest").json()["sha256"]
        acknowledged = upload(d, first, body(1, 10), key="first-1")
        assert acknowledged.status_code == 202 and acknowledged.json()["received"] == 1
        assert upload(a, first, body(1, 10), key="first-1").json() == acknowledged.json()  # a retry elsewhere
        assert b.get("/v1/rounds/1").json()["received"] == 1  # every replica sees the partial

        second = enroll(b)
        assert checkin(c, second)["task"]["round_id"] == 1
        assert upload(a, second, body(2, 30), key="second-1").status_code == 202  # the goal: a commits

        for client in (a, b, c, d):
            r1 = client.get("/v1/rounds/1").json()
            assert (r1["status"], r1["received"], r1["total_samples"], r1["result_version"]) == (
                "committed",
                2,
                40.0,
                1,
            )
            assert client.get("/healthz").json()["round_id"] == 2
        v1 = loads(b.get("/v1/models/1", headers=second).content).tensors
        for name, want in fedavg(base, [(1, 10), (2, 30)]).items():
            np.testing.assert_allclose(v1[name], want, atol=1e-6, err_msg=name)
        assert upload(c, first, body(1, 10), key="first-1").json() == acknowledged.json()  # after the commit too
        assert checkin(d, first)["task"]["round_id"] == 2

    report = audit(pg_url)
    assert report.ok, report.problems
    assert (report.acknowledged, report.in_committed_rounds, report.versions_checked) == (2, 2, 1)
    partials = execute(pg_url, "SELECT replica, received FROM round_partials WHERE round_id = 1 ORDER BY replica")
    assert sorted(n for _, n in partials) == [1, 1]  # d's and a's, one update each

    execute(pg_url, f"UPDATE round_partials SET received = received + 1 WHERE replica = '{partials[0][0]}'")
    damaged = audit(pg_url)
    assert not damaged.ok and any("partial counts 2 updates" in p for p in damaged.problems), damaged.problems


def test_concurrent_commits_race_and_exactly_one_wins(pg_url, model):
    """Two replicas settle the same due round at the same instant: one commits it, the other finds it
    closed; then both tick at once and exactly one next round opens."""
    clock = FakeClock()
    with replicas(pg_url, model, 2, clock=clock, goal=3, min_fraction=0.5, tick_interval=3600) as (a, b):
        services = [a.services, b.services]
        for seed, client in enumerate((a, b)):
            headers = enroll(client)
            assert checkin(client, headers)["task"]["round_id"] == 1
            assert upload(client, headers, body(seed, 5 + seed), key=f"k{seed}").status_code == 202
        clock.advance(3600)  # the deadline: 2 of 3 updates, enough to commit

        def race(act):
            barrier = threading.Barrier(2)

            def run(s):
                barrier.wait()
                return act(s)

            with ThreadPoolExecutor(2) as pool:
                return list(pool.map(run, services))

        assert sorted(race(lambda s: s.rounds.settle(1)), key=str) == [None, "committed"]
        race(lambda s: s.rounds.tick())
        assert [(r["id"], r["status"]) for r in a.get("/v1/rounds").json()] == [(2, "open"), (1, "committed")]
        assert [v["version"] for v in b.get("/v1/models").json()] == [1, 0]

        clock.advance(3600)  # round 2 passes its deadline with nothing: both tick, one abandons it, one opens 3
        race(lambda s: s.rounds.tick())
        assert [(r["id"], r["status"]) for r in b.get("/v1/rounds").json()] == [
            (3, "open"),
            (2, "abandoned"),
            (1, "committed"),
        ]
    report = audit(pg_url)
    assert report.ok and report.committed_rounds == 1, report.problems


def test_the_same_upload_sent_to_two_replicas_at_once_counts_once(pg_url, model):
    """A device's retry may reach another replica while the first is still writing: the same key is
    answered alike by both and counted once; two keys from one device are one update and a 409."""
    with replicas(pg_url, model, 2, goal=12) as (a, b):
        devices = [enroll(a) for _ in range(6)]
        for headers in devices:
            assert checkin(b, headers)["task"]["round_id"] == 1
        barrier = threading.Barrier(12)

        def send(job):
            i, client = job
            key = f"d{i}" if i < 3 else f"d{i}-{'ab'[client is b]}"  # devices 3-5 use a key per replica
            barrier.wait()
            return i, upload(client, devices[i], body(i, 4 + i), key=key)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(send, [(i, c) for i in range(6) for c in (a, b)]))
        by_device: dict[int, list[httpx.Response]] = {}
        for i, answer in answers:
            by_device.setdefault(i, []).append(answer)
        for i in range(3):
            first, second = by_device[i]
            assert first.status_code == second.status_code == 202 and first.json() == second.json()
        for i in range(3, 6):
            assert sorted(r.status_code for r in by_device[i]) == [202, 409]
        assert a.get("/v1/rounds/1").json()["received"] == 6
    assert execute(pg_url, "SELECT COUNT(*), SUM(sample_count) FROM updates") == [(6, sum(range(4, 10)))]
    report = audit(pg_url)
    assert report.ok and report.in_open_round == 6, report.problems


def test_replicas_starting_together_migrate_once(pg_url, model, tmp_path):
    """Three coordinator processes started at the same moment on an empty database: one migrates
    (the others wait on the advisory lock and find the schema at HEAD), one publishes v0, one opens
    round 1 -- and all three serve."""
    options = {
        "db": pg_url,
        "model": str(model),
        "enrollment_key": KEY,
        "goal": 2,
        "min_devices": 1,
        "log_level": "warning",
    }
    options["influence_bound"] = False  # exact sums are checked
    procs = []
    for i in range(3):
        (tmp_path / f"r{i}").mkdir()
        procs.append(CoordinatorProcess(tmp_path / f"r{i}", options))
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda p: p.start(timeout=120), procs))
        for proc in procs:
            assert httpx.get(proc.url + "/healthz").json() == {
                "status": "ok",
                "model_version": 0,
                "round_id": 1,
                "paused": False,
            }
    finally:
        for proc in procs:
            proc.stop()
    assert execute(pg_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]
    assert execute(pg_url, "SELECT COUNT(*) FROM model_versions") == [(1,)]
    assert execute(pg_url, "SELECT id, status FROM rounds") == [(1, "open")]


def test_stores_opened_together_on_an_empty_database(pg_url):
    """Eight stores at once, each migrating in its own transaction: the advisory lock lets one at a time."""
    barrier, stores, errors = threading.Barrier(8), [], []

    def open_store():
        barrier.wait()
        try:
            stores.append(Store(pg_url))
        except Exception as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == [] and [s.revision for s in stores] == [HEAD] * 8
    finally:
        for store in stores:
            store.close()


def test_kill_9_a_replica_between_acknowledging_and_committing_and_during_a_commit(
    pg_url, model, tmp_path, monkeypatch
):
    """Replica A acknowledges two uploads and is SIGKILLed before the round commits; a retry on B is
    answered as A answered. A restarted replica acknowledges the third and dies inside the commit's
    transaction; B, taking over the background lease, commits the round from both partials: one
    model version, equal to FedAvg of the three updates."""
    options = {
        "db": pg_url,
        "model": str(model),
        "enrollment_key": KEY,
        "influence_bound": False,  # exact sums are checked
        "goal": 3,
        "deadline": 3600,
        "strategy": "fedavgm",
        "server_momentum": 0.5,
        "tick_interval": 0.2,
        "lease_seconds": 2,
        "log_level": "info",
    }
    for name in ("a", "b", "a2"):
        (tmp_path / name).mkdir()
    a = CoordinatorProcess(tmp_path / "a", options).start()
    b = CoordinatorProcess(tmp_path / "b", options).start()
    a2 = None
    samples = {0: 12, 1: 5, 2: 40}
    try:
        with httpx.Client(base_url=a.url, timeout=30) as on_a, httpx.Client(base_url=b.url, timeout=30) as on_b:
            devices = [enroll(on_a) for _ in samples]
            for headers in devices:
                assert checkin(on_b, headers)["task"]["round_id"] == 1
            acks = [upload(on_a, devices[i], body(i, samples[i]), key=f"u{i}") for i in (0, 1)]
            assert [r.json()["received"] for r in acks] == [1, 2]
            a.proc.kill()  # acknowledged and in A's partial, not yet committed
            a.proc.wait()
            assert on_b.get("/v1/rounds/1").json()["received"] == 2
            assert upload(on_b, devices[0], body(0, samples[0]), key="u0").json() == acks[0].json()

            monkeypatch.setenv("PF_TEST_CRASH_POINT", "before_register_model")
            a2 = CoordinatorProcess(tmp_path / "a2", options).start()
            monkeypatch.delenv("PF_TEST_CRASH_POINT")
            with httpx.Client(base_url=a2.url, timeout=30) as on_a2, pytest.raises(httpx.TransportError):
                upload(on_a2, devices[2], body(2, samples[2]), key="u2")  # the goal: a2 commits, and dies in it
            assert a2.proc.wait(timeout=30) == 137, a2.log_tail()
            assert upload(on_b, devices[2], body(2, samples[2]), key="u2").json()["received"] == 3

            for _ in range(150):  # B takes the lease once A's expires, and commits on its next tick
                if on_b.get("/v1/rounds/1").json()["status"] == "committed":
                    break
                threading.Event().wait(0.1)
            r1 = on_b.get("/v1/rounds/1").json()
            assert (r1["status"], r1["received"], r1["total_samples"], r1["result_version"]) == (
                "committed",
                3,
                57.0,
                1,
            ), b.log_tail()
            got = loads(on_b.get("/v1/models/1", headers=devices[0]).content).tensors
    finally:
        for proc in (a, b, a2):
            if proc is not None:
                proc.stop()
    base = loads(model.read_bytes()).tensors
    momentum_step = fedavg(base, [(i, n) for i, n in samples.items()])  # FedAvgM's first step: base + mean
    for name in SHAPES:
        np.testing.assert_allclose(got[name], momentum_step[name], atol=1e-6, err_msg=name)
    assert execute(pg_url, "SELECT name FROM model_blobs ORDER BY name") == [("v000000.pfmodel",), ("v000001.pfmodel",)]
    assert sorted(n for (n,) in execute(pg_url, "SELECT received FROM round_partials")) == [1, 2]
    report = audit(pg_url)
    assert report.ok, report.problems
    assert (report.acknowledged, report.lost, report.double_counted, report.versions_checked) == (3, 0, 0, 0)
    assert os.environ.get("PF_TEST_CRASH_POINT") is None


def test_operator_changes_on_one_replica_hold_on_every_replica(pg_url, model):
    """Round settings patched through one replica, and pausing, reach the others (they live in the
    database); a replica restarted with the same options keeps the patched settings."""
    admin = {"Authorization": "Bearer replica-admin-token-k7Qx9Lm2Pw4Z"}
    with replicas(pg_url, model, 2, admin_token="replica-admin-token-k7Qx9Lm2Pw4Z") as (a, b):
        assert a.patch("/v1/admin/settings", json={"goal": 7, "lr": 0.01}, headers=admin).status_code == 200
        assert (b.get("/v1/admin/settings", headers=admin).json()["goal"], b.services.rounds.round_settings.lr) == (
            7,
            0.01,
        )
        assert a.post("/v1/admin/pause", headers=admin).json() == {"paused": True}
        device = enroll(b)
        for _ in range(40):  # b looks again within a second
            answer = checkin(b, device)
            if answer["status"] == "retry" and "paused" in answer["reason"]:
                break
            threading.Event().wait(0.1)
        assert answer["status"] == "retry" and "paused" in answer["reason"], answer
        assert b.get("/healthz").json()["paused"] is True
        assert b.post("/v1/admin/resume", headers=admin).json() == {"paused": False}
        assert checkin(b, device)["status"] == "task"
    with replicas(pg_url, model, 1, admin_token="replica-admin-token-k7Qx9Lm2Pw4Z") as (again,):
        assert again.get("/v1/admin/settings", headers=admin).json()["goal"] == 7
    with replicas(pg_url, model, 1, admin_token="replica-admin-token-k7Qx9Lm2Pw4Z", goal=4) as (
        changed,
    ):  # other options win
        assert changed.get("/v1/admin/settings", headers=admin).json()["goal"] == 4

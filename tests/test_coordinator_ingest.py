"""Group commit (coordinator/service/writer.py): many uploads per transaction, answered only once on disk,
with the same outcomes as one at a time -- goal reached mid-group, replays, duplicates, kill -9."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.errors import Refused
from coordinator.settings import Settings
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update

ROOT = Path(__file__).resolve().parents[1]
KEY = "ingest-enrollment-key-k7Qx9Lm2Pw4Z"
SHAPES = {"w": (6, 5), "b": (5,)}


def body(seed: int, samples: int, round_id: int = 1) -> bytes:
    return encode_update(random_delta(SHAPES, seed, scale=0.1), sample_count=samples, round_id=round_id, base_version=0)


@pytest.fixture
def service(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=2, shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        goal=3,
        over_select=2.0,
        deadline=600,
        enrollment_key=KEY,
        strategy="fedavg",
        influence_bound=False,  # the tests check the exact sample-weighted mean
    )
    app = create_app(settings)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.services, client.base = app.state.services, loads(model.read_bytes()).tensors
        yield client


def queued_while_the_writer_waits(services, uploads):
    """Prepare and queue every (device, key, body) while this thread holds the database lock, so
    the writer finds them all waiting together; then let it go and collect the outcomes."""
    with services.store.lock:
        futures = []
        for device, key, data in uploads:
            prepared = services.ingest.prepare(device.id, 1, key, data)
            futures.append(services.writer.submit(prepared))
    outcomes = []
    for future in futures:
        try:
            outcomes.append(future.result(timeout=30))
        except Refused as exc:
            outcomes.append(exc)
    return outcomes


def test_a_group_stops_at_the_goal_and_the_rest_are_late(service):
    services = service.services
    devices = [TestDevice(service, KEY) for _ in range(5)]
    for d in devices:
        assert d.task()["round_id"] == 1
    samples = [4, 7, 9, 2, 5]
    outcomes = queued_while_the_writer_waits(
        services, [(d, f"key-{i}", body(i, samples[i])) for i, d in enumerate(devices)]
    )
    assert outcomes[:3] == [{"accepted": True, "round_id": 1, "received": n, "goal": 3} for n in (1, 2, 3)]
    for late in outcomes[3:]:
        assert isinstance(late, Refused) and late.status_code == 409 and "round 1 is committed" in late.detail
    assert services.writer.applied == 3 and services.writer.groups <= 3  # fewer transactions than uploads
    r1 = service.get("/v1/rounds/1").json()
    assert (r1["status"], r1["received"], r1["total_samples"]) == ("committed", 3, sum(samples[:3]))
    got = loads(service.get("/v1/models/1", headers=devices[0].headers).content).tensors
    for name in SHAPES:  # FedAvg over exactly the first three, in the order they were queued
        mean = sum(
            n * random_delta(SHAPES, i, scale=0.1)[name].astype(np.float64) for i, n in enumerate(samples[:3])
        ) / sum(samples[:3])
        np.testing.assert_allclose(got[name], service.base[name] + mean, atol=1e-6, err_msg=name)
    assert service.get("/v1/rounds/2").json()["status"] == "open"
    metrics = service.get("/metrics").text
    assert "pf_upload_commit_updates_total 3" in metrics
    assert f"pf_upload_commits_total {services.writer.groups}" in metrics


def test_replays_and_duplicates_inside_one_group(service):
    services = service.services
    a, b = TestDevice(service, KEY), TestDevice(service, KEY)
    a.task(), b.task()
    outcomes = queued_while_the_writer_waits(
        services, [(a, "a", body(0, 5)), (a, "a", body(0, 5)), (a, "a-other", body(1, 5)), (b, "b", body(2, 6))]
    )
    first = {"accepted": True, "round_id": 1, "received": 1, "goal": 3}
    assert outcomes[0] == outcomes[1] == first  # the same key twice: one update, the same answer
    assert isinstance(outcomes[2], Refused) and outcomes[2].status_code == 409
    assert "already uploaded" in outcomes[2].detail
    assert outcomes[3] == {**first, "received": 2}
    r1 = service.get("/v1/rounds/1").json()
    assert (r1["received"], r1["total_samples"]) == (2, 11)
    assert a.upload(1, body(0, 5), key="a").json() == first  # and over HTTP later, still the same answer


def test_a_request_that_went_away_before_its_turn_is_not_applied(service):
    services = service.services
    w, x, y = (TestDevice(service, KEY) for _ in range(3))
    for d in (w, x, y):
        d.task()
    with services.store.lock:
        first = services.writer.submit(services.ingest.prepare(w.id, 1, "w", body(0, 3)))
        deadline = time.monotonic() + 10
        while not first.running():  # the writer took it and now waits for the lock
            assert time.monotonic() < deadline
            time.sleep(0.005)
        gone = services.writer.submit(services.ingest.prepare(x.id, 1, "x", body(1, 3)))
        assert gone.cancel()  # still queued: cancellable, as when the client disconnects
        last = services.writer.submit(services.ingest.prepare(y.id, 1, "y", body(2, 3)))
    assert first.result(timeout=30)["received"] == 1
    assert last.result(timeout=30)["received"] == 2
    assert service.get("/v1/rounds/1").json()["received"] == 2
    assert x.upload(1, body(1, 3), key="x").json()["received"] == 3  # its retry counts, once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path: Path, model: Path, port: int, n: int) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "coordinator",
        "--port",
        str(port),
        "--db",
        str(tmp_path / "c.db"),
        "--model",
        str(model),
        "--goal",
        "100",
        "--deadline",
        "3600",
        "--enrollment-key",
        KEY,
        "--influence-bound",  # the test checks the exact sample-weighted running sum
        "false",
        "--log-level",
        "warning",
    ]
    log = open(tmp_path / f"coordinator-{n}.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / f"coordinator-{n}.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("coordinator did not come up")


def test_kill_9_right_after_concurrent_202s_loses_none(tmp_path):
    """Concurrent uploads commit in groups; SIGKILL the moment the last 202 arrives, restart, and
    every acknowledged update is in the round's rows and in its running sum."""
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=2, shapes=SHAPES))
    port, n = free_port(), 12
    proc = start(tmp_path, model, port, 1)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            devices = [TestDevice(client, KEY) for _ in range(n)]
            for d in devices:
                d.task()
            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(lambda i: devices[i].upload(1, body(i, i + 1), key=f"k{i}"), range(n)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert [a.status_code for a in answers] == [202] * n
        assert sorted(a.json()["received"] for a in answers) == list(range(1, n + 1))

        db = sqlite3.connect(tmp_path / "c.db")  # what is on disk after the kill, before any restart
        # the open round's count and running sum: its one replica's partial (SQLite's is "local")
        received, total, blob = db.execute(
            "SELECT received, total_weight, aggregate FROM round_partials WHERE round_id=1 AND replica='local'"
        ).fetchone()
        assert db.execute("SELECT COUNT(*) FROM updates WHERE round_id=1").fetchone()[0] == n
        db.close()
        assert (received, total) == (n, sum(range(1, n + 1)))
        stored = loads(blob, kind="aggregate")
        assert stored.metadata["count"] == n
        for name in SHAPES:
            want = sum((i + 1) * random_delta(SHAPES, i, scale=0.1)[name].astype(np.float64) for i in range(n))
            np.testing.assert_allclose(stored.tensors[name], want, atol=1e-9, err_msg=name)

        proc = start(tmp_path, model, port, 2)  # and the restarted service agrees
        r1 = httpx.get(f"http://127.0.0.1:{port}/v1/rounds/1").json()
        assert (r1["status"], r1["received"]) == ("open", n)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

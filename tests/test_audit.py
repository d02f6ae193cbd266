"""coordinator.audit on a real coordinator's database: clean books pass, and each kind of damage
(a lost row, a double-counted update, wrong weights, an update in an abandoned round) is caught."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.audit import audit
from coordinator.settings import Settings
from coordinator.strategies import RunningSum
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import dumps, loads
from protocol.update import encode_update
from simulation.faultproxy import FaultProxy

ROOT = Path(__file__).resolve().parents[1]
KEY = "audit-key"
SHAPES = {"w": (32, 16), "b": (16,)}
SAMPLES = {"a": 10, "b": 30, "c": 5}


def update(name: str, round_id: int) -> bytes:
    return encode_update(
        random_delta(SHAPES, seed=ord(name), scale=0.05),
        sample_count=SAMPLES[name],
        round_id=round_id,
        base_version=round_id - 1,
        encoding="float16" if name == "b" else "float32",
    )


@pytest.fixture(scope="module")
def books(tmp_path_factory):
    """Round 1 committed from a and b (a's upload replayed once), round 2 open with c's update."""
    tmp = tmp_path_factory.mktemp("books")
    model = tmp / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=3, shapes=SHAPES))
    settings = Settings(
        db=str(tmp / "c.db"),
        model=str(model),
        enrollment_key=KEY,
        goal=2,
        min_devices=1,
        deadline=3600,
        server_lr=0.7,
        influence_bound=False,  # the books of plain FedAvg rounds (streaming, a stored running sum)
    )
    with (
        ServerThread(create_app(settings)) as server,
        FaultProxy(int(server.url.rsplit(":", 1)[1]), record_dir=tmp / "wire") as proxy,
        httpx.Client(base_url=proxy.url, timeout=10) as client,
    ):
        a, b, c = (TestDevice(client, KEY, n) for n in "abc")
        for device, name in ((a, "a"), (b, "b")):
            device.task()
            assert device.upload(1, update(name, 1), key=f"key-{name}").status_code == 202
        assert a.upload(1, update("a", 1), key="key-a").status_code == 202  # a replay
        assert c.task()["round_id"] == 2
        assert c.upload(2, update("c", 2), key="key-c").status_code == 202
        with sqlite3.connect(tmp / "c.db") as live, sqlite3.connect(tmp / "snapshot.db") as copy:
            live.backup(copy)  # a consistent copy, WAL included
    return tmp


@pytest.fixture
def copy(books, tmp_path):
    """A private copy of the books to damage: (db path, wire dir)."""
    shutil.copy(books / "snapshot.db", tmp_path / "c.db")
    shutil.copytree(books / "c.models", tmp_path / "c.models")
    shutil.copytree(books / "wire", tmp_path / "wire")
    return tmp_path / "c.db", tmp_path / "wire"


def execute(db: Path, sql: str, params: tuple = ()) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute(sql, params)


def test_clean_books_pass_and_versions_recompute_exactly(copy):
    db, wire = copy
    report = audit(db, uploads=wire)
    assert report.ok, report.problems
    assert (report.acknowledged, report.wire_acknowledged, report.ack_replays) == (3, 3, 1)
    assert (report.in_committed_rounds, report.in_open_round, report.committed_rounds) == (2, 1, 1)
    assert (report.versions_checked, report.versions_recomputed, report.versions_exact) == (1, 1, 1)
    assert report.max_abs_diff == 0.0


def test_the_formula_is_fedavg_of_the_recorded_updates(copy):
    """An independent check of what the audit accepts: v1 = base + 0.7 * weighted mean, in float32."""
    db, _ = copy
    base = loads((db.with_suffix(".models") / "v000000.pfmodel").read_bytes()).tensors
    v1 = loads((db.with_suffix(".models") / "v000001.pfmodel").read_bytes()).tensors
    deltas = {n: random_delta(SHAPES, seed=ord(n), scale=0.05) for n in "ab"}
    for name in SHAPES:
        mean = sum(SAMPLES[n] * deltas[n][name].astype(np.float64) for n in "ab") / (SAMPLES["a"] + SAMPLES["b"])
        np.testing.assert_allclose(v1[name], base[name] + 0.7 * mean, atol=1e-3)  # b travelled as float16


def test_a_lost_row_is_caught(copy):
    db, wire = copy
    execute(db, "DELETE FROM updates WHERE idempotency_key='key-c'")
    report = audit(db, uploads=wire)
    assert (report.lost, report.double_counted, report.ok) == (1, 0, False)
    assert any("key-c" in p and "no accepted row" in p for p in report.problems)


def test_an_update_added_twice_is_caught(copy):
    db, wire = copy
    with sqlite3.connect(db) as conn:
        blob = conn.execute("SELECT aggregate FROM rounds WHERE id=1").fetchone()[0]
        running = RunningSum.from_bytes(blob)
        running.add(random_delta(SHAPES, seed=ord("a"), scale=0.05), SAMPLES["a"])
        conn.execute("UPDATE rounds SET aggregate=? WHERE id=1", (running.to_bytes(),))
    report = audit(db, uploads=wire)
    assert report.double_counted == 1 and not report.ok
    assert any("stored aggregate counts 3" in p for p in report.problems)


def test_wrong_weights_are_caught_even_with_a_matching_registry(copy):
    db, wire = copy
    path = db.with_suffix(".models") / "v000001.pfmodel"
    model = loads(path.read_bytes())
    model.tensors["w"] = model.tensors["w"].copy()
    model.tensors["w"][3, 4] += 1e-3
    data = dumps(model.tensors, model.metadata, kind="model")
    path.write_bytes(data)
    execute(db, "UPDATE model_versions SET sha256=? WHERE version=1", (hashlib.sha256(data).hexdigest(),))
    for uploads in (wire, None):  # from the witnessed bodies, and from the stored running sum alone
        report = audit(db, uploads=uploads)
        assert not report.ok and report.versions_recomputed == 0
        assert any("model v1" in p and "differs" in p for p in report.problems), report.problems
        assert report.max_abs_diff == pytest.approx(1e-3, rel=1e-2)


def test_a_model_file_that_is_not_the_registered_one_is_caught(copy):
    db, wire = copy
    execute(db, "UPDATE model_versions SET sha256=? WHERE version=1", ("0" * 64,))
    report = audit(db, uploads=wire)
    assert not report.ok and any("registered sha256" in p for p in report.problems)


def test_an_acknowledged_update_in_an_abandoned_round_is_lost(copy):
    db, wire = copy
    execute(db, "UPDATE rounds SET status='abandoned' WHERE id=2")
    report = audit(db, uploads=wire)
    assert report.lost == 1 and any("abandoned" in p for p in report.problems)


def test_without_a_witness_the_stored_sums_are_checked(copy):
    db, _ = copy
    report = audit(db)
    assert report.ok, report.problems
    assert (report.versions_checked, report.versions_recomputed, report.wire_acknowledged) == (1, 0, 0)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.audit", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_cli(copy, tmp_path):
    db, wire = copy
    ok = cli("--db", str(db), "--uploads", str(wire), "--json")
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.splitlines()[-1])
    assert (line["ok"], line["lost"], line["double_counted"], line["acknowledged"]) == (True, 0, 0, 3)
    execute(db, "DELETE FROM updates WHERE idempotency_key='key-c'")
    failed = cli("--db", str(db), "--uploads", str(wire))
    assert failed.returncode == 1 and "FAILED" in failed.stdout and "key-c" in failed.stdout
    missing = cli("--db", str(tmp_path / "nope.db"))
    assert missing.returncode == 2 and "nope.db: no such database file" in missing.stderr


def test_one_ulp_of_summation_order_is_tolerated_and_reported(copy):
    db, wire = copy
    path = db.with_suffix(".models") / "v000001.pfmodel"
    model = loads(path.read_bytes())
    model.tensors["w"] = model.tensors["w"].copy()
    model.tensors["w"][0, 0] = np.nextafter(model.tensors["w"][0, 0], np.float32(np.inf))
    data = dumps(model.tensors, model.metadata, kind="model")
    path.write_bytes(data)
    execute(db, "UPDATE model_versions SET sha256=? WHERE version=1", (hashlib.sha256(data).hexdigest(),))
    report = audit(db, uploads=wire)
    assert report.ok, report.problems
    assert (report.versions_recomputed, report.versions_exact) == (1, 0) and 0 < report.max_abs_diff < 1e-6

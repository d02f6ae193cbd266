"""Evaluate and personalize tasks (issue 17): offered only to devices that declare them, never instead of
training, and their metrics aggregated per version in /v1/federated-metrics, /v1/models, /v1/rounds
and /metrics -- through a real uvicorn server on loopback."""

from __future__ import annotations

import httpx
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import (
    LENET_SHAPES,
    FakeClock,
    ServerThread,
    TestDevice,
    random_delta,
    stand_in_model_bytes,
    tick,
)
from protocol.messages import CheckinAnswer
from protocol.update import encode_update

pytest_plugins = ["postgres_helpers"]

KEY, ADMIN = "enroll-secret", "admin-secret"
KINDS = ["train", "evaluate", "personalize"]


@pytest.fixture
def service(tmp_path, request):
    """A running coordinator (SQLite; PostgreSQL when a test asks for it with indirect parametrization)."""
    model = tmp_path / "base.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=1))
    db = str(tmp_path / "coord.db")
    if getattr(request, "param", "sqlite") == "postgresql":
        databases = request.getfixturevalue("pg_databases")
        db = databases.create()
        request.addfinalizer(lambda: databases.drop(db))
    settings = Settings(
        db=db,
        model=str(model),
        goal=1,
        min_devices=1,  # one-device rounds: a test of tasks, not of privacy
        over_select=1.0,
        deadline=100,
        min_fraction=1.0,
        enrollment_key=KEY,
        admin_token=ADMIN,
        tick_interval=0.05,
    )
    clock = FakeClock()
    app = create_app(settings, clock=clock, evaluate=lambda data: {"accuracy": 0.5, "loss": 1.0, "n": 10})
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.app = app
        yield client


def checkin(device: TestDevice, kinds=None) -> CheckinAnswer:
    body = {"eligible": True, "num_samples": 10} | ({"task_kinds": kinds} if kinds is not None else {})
    answer = device.client.post("/v1/checkin", json=body, headers=device.headers)
    assert answer.status_code == 200, answer.text
    return CheckinAnswer.from_dict(answer.json())


def report(device: TestDevice, version: int, global_acc: float, personal_acc: float, samples: int = 10, **kw):
    body = {
        "version": version,
        "kind": "personalize",
        "global_accuracy": global_acc,
        "personal_accuracy": personal_acc,
        "samples": samples,
    }
    return device.client.post("/v1/federated-metrics", json=body | kw, headers=device.headers)


def commit_round(service, trainer: TestDevice) -> int:
    """The trainer takes the open round's task and uploads; returns the version the round made."""
    task = checkin(trainer, KINDS).task
    assert task is not None and task.kind == "train"
    delta = random_delta(LENET_SHAPES, seed=3)
    body = encode_update(delta, sample_count=10, round_id=task.round_id, base_version=task.base_version)
    assert trainer.upload(task.round_id, body).status_code == 202
    tick(service.app)
    paused = service.post("/v1/admin/pause", headers={"Authorization": f"Bearer {ADMIN}"})
    assert paused.status_code == 200, paused.text  # no new round: every check-in now has nothing to train
    return service.get(f"/v1/rounds/{task.round_id}").json()["result_version"]


def test_training_comes_first_and_old_agents_never_see_another_kind(service):
    trainer, old, new = (TestDevice(service, KEY, n) for n in ("trainer", "old", "new"))
    task = checkin(trainer, KINDS).task
    assert task.kind == "train" and task.round_id == 1  # room in the round: train, whatever the kinds
    assert checkin(old).status == "retry"  # the round is full; an agent that declared nothing just waits
    side = checkin(new, KINDS).task  # one that declared the kinds personalizes on the current version
    assert side.kind == "personalize" and side.base_version == 0 and side.round_id == 0
    assert checkin(new, ["train"]).status == "retry"  # "train" alone asks for nothing extra


@pytest.mark.parametrize("service", ["sqlite", "postgresql"], indirect=True)
def test_metrics_are_aggregated_per_version_with_the_lift(service):
    trainer = TestDevice(service, KEY, "trainer")
    devices = [TestDevice(service, KEY, f"d{i}") for i in range(3)]
    version = commit_round(service, trainer)
    for device, (g, p, n) in zip(devices, [(0.5, 0.9, 10), (0.7, 0.8, 30), (0.6, 0.6, 20)]):
        task = checkin(device, KINDS).task
        assert task.kind == "personalize" and task.base_version == version
        assert report(device, version, g, p, n).status_code == 204
        assert checkin(device, KINDS).status == "retry"  # reported: nothing more to ask of it
    assert report(devices[0], version, 0.5, 0.9, 10).status_code == 204  # a repeat replaces, never double counts
    want_g = (0.5 * 10 + 0.7 * 30 + 0.6 * 20) / 60
    want_p = (0.9 * 10 + 0.8 * 30 + 0.6 * 20) / 60
    fed = service.get("/v1/federated-metrics").json()[str(version)]
    assert fed["devices"] == 3 and fed["samples"] == 60
    assert fed["global_accuracy"] == pytest.approx(want_g) and fed["personal_accuracy"] == pytest.approx(want_p)
    assert fed["personalization_lift"] == pytest.approx(want_p - want_g)
    listed = {v["version"]: v for v in service.get("/v1/models").json()}
    assert listed[version]["federated"] == fed and listed[0]["federated"] is None
    rounds = {r["result_version"]: r for r in service.get("/v1/rounds").json()}
    assert rounds[version]["federated"] == fed
    text = service.get("/metrics").text
    assert f"pf_federated_version {float(version)}" in text
    assert "pf_federated_devices 3.0" in text
    lift = [line for line in text.splitlines() if line.startswith("pf_personalization_lift ")]
    assert float(lift[0].split()[1]) == pytest.approx(want_p - want_g)


def test_evaluation_requests_come_before_personalizing(service):
    device = TestDevice(service, KEY, "d")
    checkin(TestDevice(service, KEY, "busy"), KINDS)  # takes round 1's only slot
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert service.put("/v1/federated-metrics/evaluate", json={"versions": [0]}).status_code == 403
    assert service.put("/v1/federated-metrics/evaluate", json={"versions": [9]}, headers=admin).status_code == 404
    answer = service.put("/v1/federated-metrics/evaluate", json={"versions": [0]}, headers=admin)
    assert answer.status_code == 200 and answer.json() == {"versions": [0]}
    task = checkin(device, KINDS).task
    assert task.kind == "evaluate" and task.base_version == 0
    assert report(device, 0, 0.4, 0.5, kind="evaluate").status_code == 204
    assert checkin(device, KINDS).task.kind == "personalize"


@pytest.mark.parametrize(
    "change, status",
    [
        ({"version": 99}, 404),
        ({"kind": "train"}, 422),
        ({"global_accuracy": 1.5}, 422),
        ({"samples": 0}, 422),
        ({"personal_accuracy": "NaN"}, 422),
        ({"raw": [1, 2]}, 422),
    ],
)
def test_bad_reports_are_refused_with_a_reason(service, change, status):
    device = TestDevice(service, KEY, "d")
    body = {"version": 0, "kind": "personalize", "global_accuracy": 0.5, "personal_accuracy": 0.5, "samples": 5}
    answer = device.client.post("/v1/federated-metrics", json=body | change, headers=device.headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]


def test_a_stranger_cannot_report(service):
    body = {"version": 0, "kind": "personalize", "global_accuracy": 0.5, "personal_accuracy": 0.5, "samples": 5}
    assert service.post("/v1/federated-metrics", json=body).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert service.post("/v1/federated-metrics", json=body, headers=bad).status_code == 401

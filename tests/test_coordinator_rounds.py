"""The round state machine over HTTP: deadlines, over-selection, pace steering, operator calls."""

from __future__ import annotations

import time

import httpx
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings, settings_from_env
from coordinator.testing import FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes, tick
from protocol.update import encode_update

KEY, ADMIN = "k", "admin"
SHAPES = {"w": (3, 3), "b": (3,)}


@pytest.fixture
def service(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(shapes=SHAPES))
    clock = FakeClock()
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        goal=4,
        min_devices=1,
        over_select=1.25,
        deadline=60,
        min_fraction=0.5,
        enrollment_key=KEY,
        admin_token=ADMIN,
        tick_interval=0.02,
        min_retry_after=5,
        max_retry_after=600,
    )
    app = create_app(settings, clock=clock)
    with ServerThread(app) as server, httpx.Client(base_url=server.url) as client:
        client.app, client.clock, client.admin = app, clock, {"Authorization": f"Bearer {ADMIN}"}
        yield client


def upload(device, round_id, base_version=0, seed=0):
    body = encode_update(random_delta(SHAPES, seed), sample_count=5, round_id=round_id, base_version=base_version)
    return device.upload(round_id, body)


def round_status(client, round_id):
    return client.get(f"/v1/rounds/{round_id}").json()


def test_deadline_commits_with_enough_updates_and_opens_the_next_round(service):
    devices = [TestDevice(service, KEY) for _ in range(3)]
    for i, d in enumerate(devices[:2]):
        d.task()
        assert upload(d, 1, seed=i).status_code == 202
    service.clock.advance(59)
    assert round_status(service, 1)["status"] == "open"
    service.clock.advance(1)
    tick(service.app)  # what the background ticker does within tick_interval
    r1 = round_status(service, 1)
    assert r1["status"] == "committed" and r1["result_version"] == 1 and "deadline with 2/4" in r1["reason"]
    r2 = round_status(service, 2)
    assert r2["status"] == "open" and r2["base_version"] == 1 and r2["deadline"] == service.clock() + 60


def test_deadline_abandons_below_the_minimum(service):
    a, b = TestDevice(service, KEY), TestDevice(service, KEY)
    a.task(), b.task()
    assert upload(a, 1).status_code == 202
    service.clock.advance(61)
    tick(service.app)
    r1 = round_status(service, 1)
    assert r1["status"] == "abandoned" and "fewer than the minimum 2" in r1["reason"]
    assert r1["result_version"] is None
    late = upload(b, 1)
    assert late.status_code == 409 and "round 1 is abandoned" in late.json()["detail"]
    assert round_status(service, 2)["base_version"] == 0  # nothing was published
    metrics = service.get("/metrics").text
    assert 'pf_rounds_total{status="abandoned"} 1' in metrics


def test_background_task_enforces_deadlines_without_requests(service):
    store = service.app.state.services.store
    service.clock.advance(61)  # no device did anything: abandoned with 0 updates
    for _ in range(200):
        if store.round(1).status != "open" and store.open_round() is not None:  # closed, and the next opened
            break
        time.sleep(0.02)
    assert store.round(1).status == "abandoned"
    assert store.open_round().id == 2


def test_over_selection_and_pace_steering(service):
    devices = [TestDevice(service, KEY) for _ in range(6)]
    assert [d.checkin().json()["status"] for d in devices] == ["task"] * 5 + ["retry"]  # ceil(4 * 1.25) = 5
    service.clock.advance(30)
    steered = devices[5].checkin()
    assert steered.json()["retry_after"] == 30 and steered.headers["retry-after"] == "30"
    assert "all 5 devices" in steered.json()["reason"]
    service.clock.advance(28)
    assert devices[5].checkin().json()["retry_after"] == 5  # never below min_retry_after
    not_eligible = devices[0].checkin(eligible=False).json()
    assert not_eligible["status"] == "retry" and "not eligible" in not_eligible["reason"]


def test_goal_commits_at_once(service):
    devices = [TestDevice(service, KEY) for _ in range(4)]
    for i, d in enumerate(devices):
        assert d.task()["round_id"] == 1
        answer = upload(d, 1, seed=i).json()
        assert answer["received"] == i + 1 and answer["goal"] == 4
    assert round_status(service, 1)["reason"] == "goal reached"
    assert service.get("/healthz").json()["round_id"] == 2


def test_admin_pause_resume_settings_and_publish(service):
    a = TestDevice(service, KEY)
    changed = service.patch("/v1/admin/settings", json={"goal": 1, "lr": 0.2, "clip_norm": 1.5}, headers=service.admin)
    assert changed.status_code == 200 and changed.json()["goal"] == 1
    assert a.task()["lr"] == 0.05  # the open round keeps its settings
    bad = service.patch("/v1/admin/settings", json={"min_fraction": 2.0}, headers=service.admin)
    assert bad.status_code == 422 and "min_fraction" in bad.json()["detail"]
    unknown = service.patch("/v1/admin/settings", json={"colour": "red"}, headers=service.admin)
    assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]

    assert service.post("/v1/admin/pause", headers=service.admin).json() == {"paused": True}
    published = service.post(
        "/v1/admin/models", content=stand_in_model_bytes(seed=9, shapes=SHAPES), headers=service.admin
    )
    assert published.status_code == 201 and published.json()["version"] == 1
    r1 = round_status(service, 1)
    assert r1["status"] == "abandoned" and "superseded by published model v1" in r1["reason"]
    paused = a.checkin().json()
    assert paused["status"] == "retry" and "paused" in paused["reason"]
    assert service.get("/healthz").json() == {
        "status": "ok",
        "model_version": 1,
        "round_id": None,
        "paused": True,
    }

    assert service.post("/v1/admin/resume", headers=service.admin).json() == {"paused": False}
    task = a.task()
    assert (task["round_id"], task["base_version"], task["lr"], task["clip_norm"]) == (2, 1, 0.2, 1.5)
    assert upload(a, 2, base_version=1).status_code == 202  # goal 1 now
    assert round_status(service, 2)["result_version"] == 2
    garbage = service.post("/v1/admin/models", content=b"not a model", headers=service.admin)
    assert garbage.status_code == 422 and "model file" in garbage.json()["detail"]


def test_settings_come_from_flags_over_environment(tmp_path):
    env = {"PF_GOAL": "7", "PF_LR": "0.3", "PF_CLIP_NORM": "none", "PF_STRATEGY": "fedadam"}
    settings = settings_from_env(env, lr="0.4", db=str(tmp_path / "x.db"))
    assert (settings.goal, settings.lr, settings.clip_norm, settings.strategy) == (7, 0.4, None, "fedadam")
    with pytest.raises(ValueError, match="strategy"):
        settings_from_env({"PF_STRATEGY": "sgd"})

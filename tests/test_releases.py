"""Safe releases through a real server: the gate holds back a worse candidate, a canary round decides a
promotion, the operator rolls back and pins, and every change is in the audit with who and why."""

from __future__ import annotations

import httpx
import pytest

from coordinator.api import create_app
from coordinator.service.releases import canary_device
from coordinator.settings import Settings
from coordinator.testing import LENET_SHAPES, FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes
from coordinator.testing import tick as settle
from engine.serialize.container import loads
from protocol.update import encode_update

pytest_plugins = ["postgres_helpers"]  # pg_url: a throwaway PostgreSQL database

KEY, ADMIN = "enroll-secret", "admin-secret"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


class Coordinator:
    """A coordinator on a real port whose server-side evaluation scores each version as `scores` says."""

    def __init__(
        self, tmp_path, *, evaluated: bool = True, db: str | None = None, failing: int | None = None, **options
    ):
        model = tmp_path / "base.pfmodel"
        if not model.exists():
            model.write_bytes(stand_in_model_bytes(seed=1))
        self.scores: dict[int, float] = {}
        self.failing = failing  # this version's evaluation raises
        evaluate = self._evaluate if evaluated else None
        settings = Settings(
            db=db or str(tmp_path / "coord.db"),
            model=str(model),
            over_select=1.0,
            deadline=100,
            enrollment_key=KEY,
            admin_token=ADMIN,
            tick_interval=0.05,
            **{"goal": 2, "min_devices": 1, **options},
        )
        self.app = create_app(settings, clock=FakeClock(), evaluate=evaluate)
        self.server = ServerThread(self.app)

    def _evaluate(self, data: bytes) -> dict:
        version = loads(data, kind="model").metadata["version"]
        if version == self.failing:
            raise RuntimeError("held-out data unreadable")
        return {"accuracy": self.scores.get(version, 0.8), "loss": 1.0, "n": 100}

    def __enter__(self) -> httpx.Client:
        self.server.__enter__()
        self.client = httpx.Client(base_url=self.server.url, timeout=30)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.__exit__(*exc)

    def settle(self) -> None:
        """Let the evaluator finish, then settle rounds and run the gate (what the ticker does)."""
        evaluator = self.app.state.services.evaluator
        if evaluator is not None:
            evaluator.wait_idle()
        settle(self.app)


def contribute(device: TestDevice, task: dict, acc_before: float, seed: int) -> None:
    body = encode_update(
        random_delta(LENET_SHAPES, seed),
        sample_count=10,
        round_id=task["round_id"],
        base_version=task["base_version"],
        metrics={"loss": 0.5, "acc_before": acc_before},
    )
    assert device.upload(task["round_id"], body).status_code == 202


def run_round(coordinator: Coordinator, devices: list[TestDevice], acc_before: float) -> dict:
    """The open round's devices (the first that get a task) contribute; returns the task."""
    joined = []
    for device in devices:
        answer = device.checkin().json()
        if answer["status"] == "task":
            joined.append((device, answer["task"]))
    assert joined, "no device got a task"
    for i, (device, task) in enumerate(joined):
        contribute(device, task, acc_before, seed=task["round_id"] * 100 + i)
    coordinator.settle()
    return joined[0][1]


def released(client: httpx.Client) -> int:
    return client.get("/v1/models/latest").json()["version"]


def statuses(client: httpx.Client) -> dict[int, str]:
    return {v["version"]: v["release"] for v in client.get("/v1/models").json()}


def test_a_worse_candidate_is_held_back_and_a_good_one_released(tmp_path):
    coordinator = Coordinator(tmp_path, release_tolerance=0.02)
    coordinator.scores.update({0: 0.80, 1: 0.70, 2: 0.79})
    with coordinator as client:
        devices = [TestDevice(client, KEY) for _ in range(2)]
        coordinator.settle()
        run_round(coordinator, devices, acc_before=0.6)
        assert released(client) == 0  # v1 scored 0.70 < 0.80 - 0.02
        assert statuses(client)[1] == "held" and statuses(client)[0] == "released"
        held = client.get("/v1/releases").json()["events"][0]
        assert (held["version"], held["action"], held["actor"]) == (1, "held", "release-gate")
        assert "0.7000" in held["reason"] and "tolerance 0.02" in held["reason"]
        task = run_round(coordinator, devices, acc_before=0.6)
        assert task["base_version"] == 0  # the fleet kept training on the released version
        assert released(client) == 2  # 0.79 is within 0.02 of 0.80
        assert statuses(client) == {2: "released", 1: "held", 0: "retired"}
        assert client.get("/v1/rounds").json()[0]["base_version"] == 2
        assert "pf_released_version 2.0" in client.get("/metrics").text


@pytest.mark.parametrize(("canary_accuracy", "promoted"), [(0.62, True), (0.40, False)])
def test_a_canary_round_on_the_canary_devices_decides_the_promotion(tmp_path, canary_accuracy, promoted):
    coordinator = Coordinator(tmp_path, canary_fraction=0.5)
    with coordinator as client:
        devices = [TestDevice(client, KEY) for _ in range(12)]
        canaries = [d for d in devices if canary_device(d.id, 0.5)]
        others = [d for d in devices if not canary_device(d.id, 0.5)]
        assert canaries and others
        coordinator.settle()
        run_round(coordinator, others, acc_before=0.60)  # the released v0's federated baseline
        state = client.get("/v1/releases").json()
        assert (state["released"], state["canary"]) == (0, 1) and released(client) == 0
        canary_round = client.get("/v1/rounds").json()[0]
        assert canary_round["canary"] and canary_round["base_version"] == 1 and canary_round["goal"] == 1
        refusal = others[0].checkin().json()
        assert refusal["status"] == "retry" and "canary" in refusal["reason"]
        task = canaries[0].task()
        assert task["base_version"] == 1
        contribute(canaries[0], task, canary_accuracy, seed=7)
        coordinator.settle()
        state = client.get("/v1/releases").json()
        assert state["canary"] is None and released(client) == (1 if promoted else 0)
        assert state["events"][0]["action"] == ("promoted" if promoted else "held")
        assert statuses(client)[2] == "superseded"  # the canary round's own result
        following = client.get("/v1/rounds").json()[0]
        assert not following["canary"] and following["base_version"] == released(client)
        assert others[0].task()["base_version"] == released(client)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_rollback_and_pin_are_recorded_and_survive_a_restart(tmp_path, request, database):
    db = request.getfixturevalue("pg_url") if database == "postgresql" else None
    coordinator = Coordinator(tmp_path, evaluated=False, db=db)  # no held-out data: released as committed
    with coordinator as client:
        devices = [TestDevice(client, KEY) for _ in range(2)]
        coordinator.settle()
        run_round(coordinator, devices, acc_before=0.6)
        run_round(coordinator, devices, acc_before=0.6)
        assert released(client) == 2 and client.get("/v1/rounds").json()[0]["base_version"] == 2

        change = {"version": 1, "reason": "v2 drains batteries", "by": "alice"}
        assert client.post("/v1/admin/rollback", json=change).status_code == 403
        assert client.post("/v1/admin/rollback", json={**change, "version": 99}, headers=AS_ADMIN).status_code == 404
        assert client.post("/v1/admin/rollback", json={"version": 1}, headers=AS_ADMIN).status_code == 422
        answer = client.post("/v1/admin/rollback", json=change, headers=AS_ADMIN)
        assert answer.json() == {"released": 1, "canary": None, "pinned": False}
        assert released(client) == 1 and statuses(client)[2] == "rolled back"
        rounds = client.get("/v1/rounds").json()
        assert rounds[0]["base_version"] == 1 and rounds[0]["status"] == "open"
        assert rounds[1]["status"] == "abandoned" and "rollback to v1" in rounds[1]["reason"]
        event = client.get("/v1/releases").json()["events"][0]
        assert (event["version"], event["action"], event["actor"], event["reason"]) == (
            1,
            "rollback",
            "alice",
            "v2 drains batteries",
        )

        pin = {"version": 0, "reason": "freeze for the launch", "by": "bob"}
        assert client.post("/v1/admin/pin", json=pin, headers=AS_ADMIN).json()["pinned"] is True
        run_round(coordinator, devices, acc_before=0.6)  # trains on v0, commits v3: a candidate only
        assert released(client) == 0 and statuses(client)[3] == "candidate"
    with Coordinator(tmp_path, evaluated=False, db=db) as client:  # the release state lives in the database
        assert released(client) == 0 and client.get("/v1/releases").json()["pinned"] is True
        unpin = client.post("/v1/admin/unpin", json={"reason": "launch done", "by": "bob"}, headers=AS_ADMIN)
        assert unpin.json()["pinned"] is False
        assert released(client) == 3
        actions = [(e["action"], e["actor"]) for e in client.get("/v1/releases").json()["events"]]
        assert actions[:3] == [("released", "release-gate"), ("unpinned", "bob"), ("pinned", "bob")]
        assert actions[-1] == ("released", "system")  # the initial model


def test_a_candidate_that_cannot_be_evaluated_is_held_back_and_rounds_go_on(tmp_path):
    coordinator = Coordinator(tmp_path, failing=1)
    with coordinator as client:
        devices = [TestDevice(client, KEY) for _ in range(2)]
        coordinator.settle()
        run_round(coordinator, devices, acc_before=0.6)
        held = client.get("/v1/releases").json()["events"][0]
        assert (held["version"], held["action"]) == (1, "held")
        assert "server evaluation failed: held-out data unreadable" in held["reason"]
        following = client.get("/v1/rounds").json()[0]
        assert (following["id"], following["status"], following["base_version"]) == (2, "open", 0)


def test_a_canary_round_that_does_not_commit_holds_the_candidate_back(tmp_path):
    """One canary device's good metrics in a round that never reached --min-devices promote nothing."""
    coordinator = Coordinator(tmp_path, canary_fraction=0.5, min_devices=2, goal=4)
    with coordinator as client:
        devices = [TestDevice(client, KEY) for _ in range(16)]
        canaries = [d for d in devices if canary_device(d.id, 0.5)]
        others = [d for d in devices if not canary_device(d.id, 0.5)]
        coordinator.settle()
        run_round(coordinator, others, acc_before=0.60)
        assert client.get("/v1/releases").json()["canary"] == 1
        task = canaries[0].task()
        contribute(canaries[0], task, acc_before=0.95, seed=7)  # one device: below the round's 2
        coordinator.app.state.services.rounds.clock.advance(101)  # past the deadline
        coordinator.settle()
        state = client.get("/v1/releases").json()
        assert client.get(f"/v1/rounds/{task['round_id']}").json()["status"] == "abandoned"
        assert state["canary"] is None and released(client) == 0
        assert state["events"][0]["action"] == "held" and "did not commit" in state["events"][0]["reason"]

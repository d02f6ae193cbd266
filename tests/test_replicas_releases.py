"""Release state (issue 17) across replicas on one PostgreSQL database: what one replica changes,
every other one serves (tests/test_replicas.py has the replica harness)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_replicas import SHAPES, body, checkin, enroll, replicas, upload

from coordinator.testing import stand_in_model_bytes

pytest_plugins = ["postgres_helpers"]  # pg_url: a throwaway PostgreSQL database


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "base.pfmodel"
    path.write_bytes(stand_in_model_bytes(seed=7, shapes=SHAPES))
    return path


def test_every_replica_serves_the_release_another_one_changed(pg_url, model):
    """Release state lives in the database: a rollback and a pin made on one replica are what every
    other one serves, opens rounds on and lists; a population created on one is served by another."""
    with replicas(pg_url, model, 2, goal=1, admin_token="replica-admin") as (a, b):
        admin = {"Authorization": "Bearer replica-admin"}
        device = enroll(a)
        task = checkin(b, device)["task"]
        assert upload(a, device, body(1, 10), "k1").status_code == 202
        b.services.tick()
        assert a.get("/v1/models/latest").json()["version"] == b.get("/v1/models/latest").json()["version"] == 1
        change = {"version": 0, "reason": "v1 misbehaves", "by": "oncall"}
        assert a.post("/v1/admin/rollback", json=change, headers=admin).status_code == 200
        assert b.get("/v1/models/latest").json()["version"] == 0
        assert checkin(b, device)["task"]["base_version"] == 0 and task["base_version"] == 0
        assert [v["release"] for v in b.get("/v1/models").json()] == ["rolled back", "released"]
        assert b.post("/v1/admin/pin", json={**change, "reason": "hold"}, headers=admin).json()["pinned"]
        assert a.get("/v1/releases").json()["pinned"] is True

        made = a.post("/v1/admin/populations?name=tv", content=model.read_bytes(), headers=admin)
        assert made.status_code == 201
        tv = b.post("/v1/populations/tv/devices", json={"enrollment_key": made.json()["enrollment_key"]})
        assert tv.status_code == 201  # replica b opened the population replica a created
        assert a.get(
            "/v1/populations/tv/models/0", headers={"Authorization": f"Bearer {tv.json()['token']}"}
        ).is_success

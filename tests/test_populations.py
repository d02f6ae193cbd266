"""Several populations on one coordinator (a real server): created by the operator with a model file,
each with its own devices, model, rounds and releases; a device of one can never see another's."""

from __future__ import annotations

import secrets

import httpx
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import LENET_SHAPES, FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes
from protocol.update import encode_update

pytest_plugins = ["postgres_helpers"]  # pg_url: a throwaway PostgreSQL database

KEY, ADMIN = "enroll-secret", "admin-secret"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def coordinator(tmp_path, db: str | None, **options):
    model = tmp_path / "base.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=1))
    settings = Settings(
        db=db or str(tmp_path / "coord.db"),
        model=str(model),
        goal=1,
        min_devices=1,
        over_select=1.0,
        enrollment_key=KEY,
        admin_token=ADMIN,
        tick_interval=0.05,
        **options,
    )
    return ServerThread(create_app(settings, clock=FakeClock()))


def contribute(device: TestDevice) -> dict:
    task = device.task()
    body = encode_update(
        random_delta(LENET_SHAPES, seed=3),
        sample_count=10,
        round_id=task["round_id"],
        base_version=task["base_version"],
        metrics={"loss": 0.5},
    )
    assert device.upload(task["round_id"], body).status_code == 202
    return task


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_populations_are_isolated(tmp_path, request, database):
    db = request.getfixturevalue("pg_url") if database == "postgresql" else None
    keyboard_model = stand_in_model_bytes(seed=2)
    with coordinator(tmp_path, db) as server, httpx.Client(base_url=server.url, timeout=30) as top:
        create = "/v1/admin/populations?name=keyboard&by=carol"
        assert top.post(create, content=keyboard_model).status_code == 403
        assert (
            top.post("/v1/admin/populations?name=Bad-Name", content=keyboard_model, headers=AS_ADMIN).status_code == 422
        )
        assert top.post("/v1/admin/populations?name=x", content=b"not a model", headers=AS_ADMIN).status_code == 422
        made = top.post(create, content=keyboard_model, headers=AS_ADMIN)
        assert made.status_code == 201, made.text
        keyboard_key = made.json()["enrollment_key"]
        assert top.post(create, content=keyboard_model, headers=AS_ADMIN).status_code == 409
        listed = {p["name"]: p for p in top.get("/v1/populations").json()}
        assert set(listed) == {"default", "keyboard"} and listed["keyboard"]["created_by"] == "carol"
        assert top.get("/v1/populations/nowhere/models/latest").status_code == 404

        # a device agent speaks to a population with its server URL ending in /populations/{name}
        keyboard = httpx.Client(base_url=server.url + "/populations/keyboard", timeout=30)
        with keyboard:
            assert keyboard.post("/v1/devices", json={"enrollment_key": KEY}).status_code == 401
            assert top.post("/v1/devices", json={"enrollment_key": keyboard_key}).status_code == 401
            a, b = TestDevice(top, KEY, "a"), TestDevice(keyboard, keyboard_key, "b")

            # each population's own model: different files, same version numbers
            default_v0 = top.get("/v1/models/0", headers=a.headers)
            keyboard_v0 = keyboard.get("/v1/models/0", headers=b.headers)
            assert default_v0.status_code == keyboard_v0.status_code == 200
            assert keyboard_v0.content == keyboard_model and default_v0.content != keyboard_model
            assert top.get("/v1/populations/keyboard/models/0", headers=b.headers).content == keyboard_model

            # a token of one population is unknown to the other, on every device route
            for client, stranger in ((top, b), (keyboard, a)):
                assert client.get("/v1/models/0", headers=stranger.headers).status_code == 401
                assert client.post("/v1/checkin", json={"eligible": True}, headers=stranger.headers).status_code == 401
                assert client.get(f"/v1/devices/{stranger.id}", headers=stranger.headers).status_code == 401
                assert stranger.client is not client
                assert client.post("/v1/rounds/1/updates", content=b"x", headers=stranger.headers).status_code == 401

            # one-time enrollment codes are the population's own too
            codes = top.post("/v1/populations/keyboard/admin/enrollment-codes", json={"count": 1}, headers=AS_ADMIN)
            code = codes.json()["codes"][0]
            assert top.post("/v1/devices", json={"enrollment_key": code}).status_code == 401
            assert keyboard.post("/v1/devices", json={"enrollment_key": code}).status_code == 201

            # settings are the population's own (the admin token is the coordinator's)
            patched = top.patch("/v1/populations/keyboard/admin/settings", json={"epochs": 3}, headers=AS_ADMIN)
            assert patched.status_code == 200 and patched.json()["epochs"] == 3
            assert top.get("/v1/admin/settings", headers=AS_ADMIN).json()["epochs"] == 1
            assert top.patch("/v1/populations/keyboard/admin/settings", json={"epochs": 3}).status_code == 403

            # rounds and releases are the population's own
            task = contribute(b)
            assert task["round_id"] == 1 and task["base_version"] == 0
            assert keyboard.get("/v1/rounds/1").json()["status"] == "committed"
            assert keyboard.get("/v1/models/latest").json()["version"] == 1
            assert (
                top.get("/v1/rounds/1").json()["status"] == "open" and top.get("/v1/rounds/1").json()["received"] == 0
            )
            assert top.get("/v1/models/latest").json()["version"] == 0
            assert [e["version"] for e in keyboard.get("/v1/releases").json()["events"]] == [1, 0]
            assert [e["version"] for e in top.get("/v1/releases").json()["events"]] == [0]
            assert "pf_devices 2.0" in top.get("/v1/populations/keyboard/metrics").text  # b and the code
            page = top.get("/v1/populations/keyboard/dashboard")
            assert page.status_code == 200 and "pocketfed · keyboard" in page.text
            assert 'href="/v1/populations/keyboard/dashboard"' in top.get("/").text  # the default links to it

    with coordinator(tmp_path, db) as server, httpx.Client(base_url=server.url, timeout=30) as top:
        # after a restart: the population, its devices and its versions are still there
        again = {"Authorization": b.headers["Authorization"]}
        assert top.get("/v1/populations/keyboard/models/latest").json()["version"] == 1
        assert top.get("/v1/populations/keyboard/models/1", headers=again).status_code == 200
        assert top.get("/v1/models/1", headers=again).status_code == 401


@pytest.mark.slow
def test_unchanged_agents_federate_in_two_populations(tmp_path):
    """Real `pf-agent` processes: one enrolls in the default population, one in a named one (its server
    URL ends in /populations/{name}); each population commits a round from its own device only."""
    from test_agent_harness import Coordinator, device_token, finish, make_shards, start_agent

    from coordinator.service.modelfile import initial_model_bytes

    (shard_a, shard_b), _ = make_shards(tmp_path, 2, 120, partition="iid", seed=4)
    admin = secrets.token_urlsafe(24)  # pf-coordinator refuses weak secrets
    with Coordinator(tmp_path, goal=1, admin_token=admin) as server:
        made = httpx.post(
            f"{server.url}/v1/admin/populations?name=watch",
            content=initial_model_bytes("lenet", seed=5),
            headers={"Authorization": f"Bearer {admin}"},
            timeout=60,
        )
        assert made.status_code == 201, made.text
        watch = f"{server.url}/populations/watch"
        agents = [
            start_agent(server.url, shard_a, tmp_path / "state-a", "--rounds", "1"),
            start_agent(
                watch, shard_b, tmp_path / "state-b", "--rounds", "1", "--enrollment-key", made.json()["enrollment_key"]
            ),
        ]
        for agent in agents:
            finish(agent, timeout=300)
        token_a, token_b = device_token(tmp_path / "state-a"), device_token(tmp_path / "state-b")
        for path, own, other in (("", token_a, token_b), ("/populations/watch", token_b, token_a)):
            rounds = httpx.get(f"{server.url}{path}/v1/rounds", timeout=10).json()
            assert [r["status"] for r in rounds if r["id"] == 1] == ["committed"]
            assert (
                httpx.get(f"{server.url}{path}/v1/models/1", headers={"Authorization": f"Bearer {own}"}).status_code
                == 200
            )
            refused = httpx.get(f"{server.url}{path}/v1/models/1", headers={"Authorization": f"Bearer {other}"})
            assert refused.status_code == 401


def test_the_number_of_populations_is_bounded(tmp_path):
    with coordinator(tmp_path, None, max_populations=1) as server, httpx.Client(base_url=server.url) as client:
        model = stand_in_model_bytes(seed=2)
        assert client.post("/v1/admin/populations?name=one", content=model, headers=AS_ADMIN).status_code == 201
        refused = client.post("/v1/admin/populations?name=two", content=model, headers=AS_ADMIN)
        assert refused.status_code == 409 and "at most 1" in refused.json()["detail"]
        assert client.post("/v1/admin/populations?name=..%2Fetc", content=model, headers=AS_ADMIN).status_code == 422

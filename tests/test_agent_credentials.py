"""The agent trades its token for a new one when it is due, against a real coordinator: the old
token is refused from then on, the new one is saved, and an identity saved before tokens had an
age starts its clock instead of rotating at once."""

from __future__ import annotations

import json

import httpx
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread, stand_in_model_bytes
from device_agent.client import CoordinatorClient, RetryPolicy
from device_agent.credentials import DAY, ensure_token
from device_agent.runner import AgentConfig
from device_agent.state import AgentState

KEY = "credentials-test-enrollment-key"


@pytest.fixture
def server(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(shapes={"w": (2, 2)}))
    with ServerThread(create_app(Settings(db=str(tmp_path / "c.db"), model=str(model), enrollment_key=KEY))) as s:
        yield s


def own_record(url: str, device_id: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{url}/v1/devices/{device_id}", headers=headers).status_code


def test_a_due_token_is_rotated_and_the_old_one_refused(server, tmp_path):
    state = AgentState(tmp_path / "state")
    config = AgentConfig(coordinator=server.url, enrollment_key=KEY, rotate_token_days=30)
    with CoordinatorClient(server.url, retry=RetryPolicy(attempts=1)) as client:
        ensure_token(client, state, config, now=1_000.0)
        first = state.identity(server.url)
        assert first["issued_at"] == 1_000.0 and client.token == first["token"]
        ensure_token(client, state, config, now=1_000.0 + 29 * DAY)  # not yet due
        assert state.identity(server.url)["token"] == first["token"]
        ensure_token(client, state, config, now=1_000.0 + 30 * DAY)
        second = state.identity(server.url)
    assert second["device_id"] == first["device_id"] and second["token"] != first["token"]
    assert second["issued_at"] == 1_000.0 + 30 * DAY and client.token == second["token"]
    assert own_record(server.url, first["device_id"], first["token"]) == 401
    assert own_record(server.url, first["device_id"], second["token"]) == 200


def test_never_rotates_with_zero_days_and_an_ageless_identity_starts_its_clock(server, tmp_path):
    state = AgentState(tmp_path / "state")
    config = AgentConfig(coordinator=server.url, enrollment_key=KEY, rotate_token_days=0)
    with CoordinatorClient(server.url, retry=RetryPolicy(attempts=1)) as client:
        ensure_token(client, state, config, now=0.0)
        token = state.identity(server.url)["token"]
        ensure_token(client, state, config, now=1_000 * DAY)
        assert state.identity(server.url)["token"] == token  # 0: never
        path = tmp_path / "state" / "identity.json"
        old = json.loads(path.read_text())
        del old["issued_at"]  # written by an agent from before rotation
        path.write_text(json.dumps(old))
        config.rotate_token_days = 30
        ensure_token(client, state, config, now=5_000 * DAY)
        assert state.identity(server.url) == {**old, "issued_at": 5_000 * DAY}  # stamped, not rotated
    assert own_record(server.url, old["device_id"], token) == 200

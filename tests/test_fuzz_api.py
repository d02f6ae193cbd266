"""Property-based fuzzing of the whole coordinator API from its own OpenAPI schema (schemathesis),
against a real uvicorn server on loopback: no 5xx, responses as documented, and a refused request
changes nothing in the database."""

from __future__ import annotations

import sqlite3

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis (dev extra) is not installed")
import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error, response_schema_conformance  # noqa: E402

from coordinator.api import create_app  # noqa: E402
from coordinator.settings import Settings  # noqa: E402
from coordinator.testing import FakeClock, ServerThread, TestDevice, stand_in_model_bytes  # noqa: E402

KEY, ADMIN = "fuzz-enroll", "fuzz-admin"
EXAMPLES = 40  # per operation; about 15 operations -> a few hundred requests, well under a minute


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model = root / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=0, shapes={"w": (8, 4), "b": (4,)}))
    settings_ = Settings(
        db=str(root / "c.db"),
        model=str(model),
        enrollment_key=KEY,
        admin_token=ADMIN,
        goal=2,
        min_devices=1,
        deadline=1000,
        max_body_bytes=100_000,
    )
    app = create_app(settings_, clock=FakeClock())
    with ServerThread(app) as server:
        with httpx.Client(base_url=server.url) as client:
            device = TestDevice(client, KEY, "fuzzer")
        server.token, server.db_path, server.services = device.token, root / "c.db", app.state.services
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


def snapshot(db_path) -> dict:
    """Everything a request could change, read through a separate connection."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        state = {
            table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("devices", "model_versions", "rounds", "assignments", "updates")
        }
        state["server_state"] = conn.execute("SELECT key, value FROM server_state ORDER BY key").fetchall()
        state["rounds_rows"] = conn.execute("SELECT id, status, received FROM rounds").fetchall()
        return state
    finally:
        conn.close()


def check_case(case, server) -> None:
    token = ADMIN if case.path.startswith("/v1/admin") else server.token
    before = snapshot(server.db_path)
    settings_before = server.services.rounds.round_settings.model_dump()
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    assert response.status_code < 500, response.text
    if 400 <= response.status_code < 500:
        assert "detail" in response.json(), response.text  # every refusal says which field and why
        assert snapshot(server.db_path) == before, f"{case.method} {case.path} refused but changed state"
        assert server.services.rounds.round_settings.model_dump() == settings_before


def test_api_never_fails_and_refusals_change_nothing(api_schema, fuzz_server):
    # Schemathesis' Python API with plain hypothesis, rather than its pytest plugin (which reaches into
    # pytest internals that newer pytest releases removed).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12, [f"{op.method} {op.path}" for op in operations]
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def fuzz(case):
            check_case(case, fuzz_server)

        fuzz()

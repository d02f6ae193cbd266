"""The upload's raw ASGI path (coordinator/api/fast_upload.py) answers as the FastAPI route does,
leaves the unusual requests to it, and the group-commit writer waits only for uploads on their way."""

from __future__ import annotations

import time

import httpx
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes
from protocol.update import encode_update

KEY = "fast-path-enrollment-key-k7Qx9Lm2Pw4Z"
SHAPES = {"w": (6, 5), "b": (5,)}
ROUTE = 'route="/v1/rounds/{round_id}/updates"'


def body(seed: int, samples: int = 3) -> bytes:
    return encode_update(random_delta(SHAPES, seed, scale=0.1), sample_count=samples, round_id=1, base_version=0)


@pytest.fixture
def service(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=2, shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        goal=4,
        over_select=2.0,
        deadline=600,
        enrollment_key=KEY,
        strategy="fedavg",
    )
    app = create_app(settings)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.services = app.state.services
        yield client


def test_an_upload_is_accepted_counted_and_replayed(service):
    a = TestDevice(service, KEY)
    a.task()
    first = a.upload(1, body(0), key="k1")
    assert first.status_code == 202 and first.json() == {"accepted": True, "round_id": 1, "received": 1, "goal": 4}
    assert first.headers["content-type"] == "application/json"
    assert a.upload(1, body(0), key="k1").json() == first.json()  # the same key: the same answer
    other = a.upload(1, body(1), key="k1")  # the same key, another body
    assert other.status_code == 422 and "already used for a different body" in other.json()["detail"]
    metrics = service.get("/metrics").text
    assert f'method="POST",{ROUTE},status="202"' in metrics  # labelled by the route's template
    assert 'pf_updates_refused_total{reason="idempotency_key_reused"} 1.0' in metrics


@pytest.mark.parametrize(
    ("headers", "status", "detail"),
    [
        ({"Idempotency-Key": "k"}, 401, "missing bearer token"),
        ({"Authorization": "Basic abc", "Idempotency-Key": "k"}, 401, "missing bearer token"),
        ({"Authorization": "Bearer not-a-token", "Idempotency-Key": "k"}, 401, "unknown or revoked"),
        ({"Authorization": "Bearer {token}"}, 400, "Idempotency-Key: header is required"),
        ({"Authorization": "Bearer {token}", "Idempotency-Key": "k" * 201}, 422, "idempotency-key"),
    ],
)
def test_unusual_uploads_get_the_routes_answers(service, headers, status, detail):
    a = TestDevice(service, KEY)
    a.task()
    headers = {k: v.format(token=a.token) for k, v in headers.items()}
    answer = service.post("/v1/rounds/1/updates", content=body(0), headers=headers)
    assert answer.status_code == status, answer.text
    assert detail.lower() in answer.json()["detail"].lower()
    if status == 401:
        assert answer.headers["www-authenticate"] == "Bearer"


def test_refusals_on_the_raw_path(service):
    a, b = TestDevice(service, KEY), TestDevice(service, KEY)
    a.task()
    headers = {**b.headers, "Idempotency-Key": "b1"}
    assert service.post("/v1/rounds/1/updates", content=body(0), headers=headers).status_code == 403  # unassigned
    assert service.post("/v1/rounds/9/updates", content=body(0), headers=headers).status_code == 404
    unknown = service.post("/v1/populations/nope/rounds/1/updates", content=body(0), headers=headers)
    assert unknown.status_code == 404 and "population" in unknown.json()["detail"]
    bad = a.upload(1, b"not a container", key="a1")
    assert bad.status_code == 422 and bad.json()["detail"].startswith("update:")
    assert a.upload(1, body(0), key="a2").status_code == 202  # a refused body took nothing


def test_the_writer_waits_for_an_expected_upload_and_never_for_none(service):
    services = service.services
    a, b = TestDevice(service, KEY), TestDevice(service, KEY)
    a.task(), b.task()
    writer = services.writer
    writer.linger = 60.0
    groups = writer.groups
    lone = services.ingest.prepare_and_submit(a.id, 1, "a", body(0))
    assert lone.result(timeout=30)["received"] == 1  # nothing expected: committed at once
    assert writer.groups == groups + 1

    c, d = TestDevice(service, KEY), TestDevice(service, KEY)
    c.task(), d.task()
    on_its_way = writer.expect()
    first = services.ingest.prepare_and_submit(b.id, 1, "b", body(1))
    time.sleep(0.3)
    assert not first.done()  # its group waits for the upload on its way
    second = services.ingest.prepare_and_submit(c.id, 1, "c", body(2), expected=on_its_way)
    assert {first.result(timeout=30)["received"], second.result(timeout=30)["received"]} == {2, 3}
    assert writer.groups == groups + 2  # both in one group
    on_its_way.done()  # twice is harmless
    assert writer.arrivals.count == 0

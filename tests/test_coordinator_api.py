"""The device flow and every refusal, through a real uvicorn server on loopback with httpx."""

from __future__ import annotations

import hashlib
import re

import httpx
import numpy as np
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
from engine.serialize.container import dumps, loads
from protocol.update import encode_update

KEY, ADMIN = "enroll-secret", "admin-secret"


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "base.pfmodel"
    path.write_bytes(stand_in_model_bytes(seed=1))
    return path


@pytest.fixture
def service(tmp_path, model_file):
    """A running coordinator (goal 2, over-selection 1.5 -> 3 slots) and an httpx client for it."""
    clock = FakeClock()
    settings = Settings(
        db=str(tmp_path / "coord.db"),
        model=str(model_file),
        goal=2,
        min_devices=1,
        over_select=1.5,
        deadline=100,
        min_fraction=0.5,
        enrollment_key=KEY,
        admin_token=ADMIN,
        max_body_bytes=600_000,
        max_update_norm=50.0,
        max_sample_count=10_000,
        tick_interval=0.05,
    )
    app = create_app(settings, clock=clock, evaluate=lambda data: {"accuracy": 0.5, "loss": 1.0, "n": 10})
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        client.app, client.clock = app, clock
        yield client


def update_bytes(round_id=1, base_version=0, seed=0, samples=10, **kw):
    return encode_update(
        random_delta(LENET_SHAPES, seed),
        sample_count=samples,
        round_id=round_id,
        base_version=base_version,
        metrics={"loss": 0.5},
        **kw,
    )


def test_whole_device_flow(service):
    a, b = TestDevice(service, KEY, "a"), TestDevice(service, KEY, "b")
    latest = service.get("/v1/models/latest", headers=a.headers).json()
    assert latest["version"] == 0 and latest["architecture"] == "lenet-standin"
    assert latest["num_parameters"] == sum(int(np.prod(s)) for s in LENET_SHAPES.values())

    download = service.get("/v1/models/0", headers=a.headers)
    assert download.status_code == 200 and download.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(download.content).hexdigest() == latest["sha256"]
    assert download.headers["etag"] == f'"{latest["sha256"]}"' and latest["size_bytes"] == len(download.content)
    cached = service.get("/v1/models/0", headers={**a.headers, "If-None-Match": download.headers["etag"]})
    assert cached.status_code == 304 and cached.content == b""

    task = a.task()
    assert task["round_id"] == 1 and task["base_version"] == 0 and task["deadline"] == service.clock() + 100
    assert a.task() == task  # checking in again gives the same assignment
    assert b.task()["round_id"] == 1

    first = a.upload(1, update_bytes(seed=1, samples=10, encoding="int8"))
    assert first.status_code == 202 and first.json() == {
        "accepted": True,
        "round_id": 1,
        "received": 1,
        "goal": 2,
    }
    assert a.checkin().json()["status"] == "retry"  # already contributed
    assert a.upload(1, update_bytes(seed=1, samples=10, encoding="int8")).json() == first.json()  # replay
    assert b.upload(1, update_bytes(seed=2, samples=30, topk_fraction=0.5)).status_code == 202
    service.app.state.services.evaluator.wait_idle()  # the release gate waits for the server's evaluation
    tick(service.app)
    newest = service.get("/v1/models").json()[0]
    assert (newest["version"], newest["release"]) == (1, "released")  # as good as v0 by the evaluation

    rounds = service.get("/v1/rounds").json()
    assert [(r["id"], r["status"]) for r in rounds] == [(2, "open"), (1, "committed")]
    assert rounds[1]["result_version"] == 1 and rounds[1]["received"] == 2 and rounds[1]["total_samples"] == 40
    assert service.get("/v1/rounds/1").json()["participants"] is None  # public: aggregates only
    detail = service.get("/v1/rounds/1", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert sorted(p["device_id"] for p in detail["participants"]) == sorted([a.id, b.id])
    assert detail["metrics"] == {"loss": pytest.approx(0.5)}
    assert service.get("/v1/models/latest", headers=a.headers).json()["version"] == 1
    new_model = loads(service.get("/v1/models/1", headers=a.headers).content, kind="model")
    assert new_model.metadata["version"] == 1 and new_model.metadata["graph"] == {"nodes": []}
    assert a.task()["round_id"] == 2 and a.task()["base_version"] == 1  # the next round opened by itself
    assert service.get("/healthz").json() == {
        "status": "ok",
        "model_version": 1,
        "round_id": 2,
        "paused": False,
    }


def test_authentication_refusals(service):
    bad_key = service.post("/v1/devices", json={"enrollment_key": "nope", "name": None})
    assert bad_key.status_code == 401 and "enrollment_key" in bad_key.json()["detail"]
    no_token = service.post("/v1/checkin", json={"eligible": True})
    assert no_token.status_code == 401 and "missing bearer token" in no_token.json()["detail"]
    bad_token = service.post("/v1/checkin", json={"eligible": True}, headers={"Authorization": "Bearer forged"})
    assert bad_token.status_code == 401 and "unknown" in bad_token.json()["detail"]
    assert service.get("/v1/models/0").status_code == 401
    a, b = TestDevice(service, KEY), TestDevice(service, KEY)
    other = service.get(f"/v1/devices/{b.id}", headers=a.headers)
    assert other.status_code == 403 and "another device" in other.json()["detail"]
    assert service.get(f"/v1/devices/{a.id}", headers=a.headers).json()["device_id"] == a.id
    for call in (
        lambda h: service.post("/v1/admin/pause", headers=h),
        lambda h: service.patch("/v1/admin/settings", json={"goal": 3}, headers=h),
        lambda h: service.post("/v1/admin/models", content=stand_in_model_bytes(), headers=h),
    ):
        for headers in ({}, a.headers, {"Authorization": "Bearer wrong"}):
            answer = call(headers)
            assert answer.status_code == 403 and "admin token" in answer.json()["detail"]
    assert service.get("/healthz").json()["paused"] is False  # none of them took effect


def test_upload_refusals_leave_the_aggregate_untouched(service):
    a, b, outsider = TestDevice(service, KEY), TestDevice(service, KEY), TestDevice(service, KEY)
    a.task(), b.task()

    def refused(device, body, status, text, round_id=1, key=None):
        answer = device.upload(round_id, body, key=key)
        assert answer.status_code == status, answer.text
        assert re.search(text, answer.json()["detail"]), answer.json()["detail"]

    good = update_bytes(seed=3)
    refused(a, good, 404, "round 99 does not exist", round_id=99)
    refused(outsider, good, 403, "not assigned to round 1")
    refused(a, b"PFTENSOR garbage", 422, "update: ")
    refused(a, b"", 422, "body: empty")
    wrong_shape = dict(random_delta(LENET_SHAPES, 0), **{"fc3.bias": np.zeros(11, np.float32)})
    refused(
        a,
        encode_update(wrong_shape, sample_count=5, round_id=1, base_version=0),
        422,
        r"fc3.bias.*shape \[11\].*\[10\]",
    )
    missing = {k: v for k, v in random_delta(LENET_SHAPES, 0).items() if k != "fc1.weight"}
    refused(a, encode_update(missing, sample_count=5, round_id=1, base_version=0), 422, "missing.*fc1.weight")
    refused(a, update_bytes(round_id=2), 422, "round_id 2 does not match")
    refused(a, update_bytes(base_version=7), 422, "base_version 7 does not match")
    refused(a, update_bytes(samples=10_001), 422, "sample_count 10001 exceeds")
    big = {k: v * 1000 for k, v in random_delta(LENET_SHAPES, 0).items()}
    refused(a, encode_update(big, sample_count=5, round_id=1, base_version=0), 422, "L2 norm .* exceeds the bound")
    nan = random_delta(LENET_SHAPES, 0)
    nan["fc2.bias"][3] = np.nan
    container = loads(update_bytes())  # NaN written past the encoder, which refuses to send it
    container.tensors["fc2.bias"] = nan["fc2.bias"]
    refused(a, dumps(container.tensors, container.metadata, kind="update"), 422, "fc2.bias.*NaN")
    int8 = loads(update_bytes(encoding="int8"))
    int8.metadata["tensors"]["fc3.bias"]["scale"] = -1.0
    refused(a, dumps(int8.tensors, int8.metadata, kind="update"), 422, "fc3.bias.*scale")
    too_big = service.post(
        "/v1/rounds/1/updates", content=b"x" * 600_001, headers={**a.headers, "Idempotency-Key": "k"}
    )
    assert too_big.status_code == 413 and "limit of 600000 bytes" in too_big.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading the stream
        for _ in range(10):
            yield b"y" * 100_000

    streamed = service.post("/v1/rounds/1/updates", content=chunks(), headers={**a.headers, "Idempotency-Key": "s"})
    assert streamed.status_code == 413 and "more than the limit" in streamed.json()["detail"]
    no_key = service.post("/v1/rounds/1/updates", content=good, headers=a.headers)
    assert no_key.status_code == 400 and "Idempotency-Key" in no_key.json()["detail"]
    assert service.get("/v1/rounds/1").json()["received"] == 0  # nothing refused touched the round

    assert a.upload(1, good, key="first").status_code == 202
    refused(a, update_bytes(seed=4), 409, "already uploaded", key="second")
    assert b.upload(1, update_bytes(seed=5)).status_code == 202  # goal 2: round 1 commits
    service.app.state.services.evaluator.wait_idle()  # the release gate waits for v1's evaluation
    tick(service.app)
    refused(outsider, good, 403, "not assigned")
    c = TestDevice(service, KEY)
    c.task()  # assigned to round 2; round 1 is closed for it too
    refused(c, good, 403, "not assigned to round 1")
    late = service.post("/v1/checkin", json={"eligible": "maybe"}, headers=a.headers)
    assert late.status_code == 422 and "eligible" in late.json()["detail"]
    unknown_model = service.get("/v1/models/42", headers=a.headers)
    assert unknown_model.status_code == 404 and "version 42" in unknown_model.json()["detail"]
    assert service.get("/v1/rounds/77").status_code == 404


def test_late_update_to_a_closed_round_is_refused(service):
    devices = [TestDevice(service, KEY) for _ in range(3)]
    for d in devices:
        assert d.task()["round_id"] == 1  # over-selection: 3 slots for a goal of 2
    fourth = TestDevice(service, KEY).checkin()
    assert fourth.json()["status"] == "retry" and int(fourth.headers["retry-after"]) == fourth.json()["retry_after"]
    assert devices[0].upload(1, update_bytes(seed=1)).status_code == 202
    assert devices[1].upload(1, update_bytes(seed=2)).status_code == 202
    late = devices[2].upload(1, update_bytes(seed=3))
    assert late.status_code == 409 and "round 1 is committed; late update refused" in late.json()["detail"]


def parse_prometheus(text: str) -> dict[str, dict[tuple, float]]:
    """A strict little parser of the text exposition format: HELP/TYPE comments and samples."""
    sample = re.compile(
        r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*"'
        r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*")*)\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$'
    )
    series: dict[str, dict[tuple, float]] = {}
    typed, histograms = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "histogram", "untyped") and name not in typed
            typed.add(name)
            if kind == "histogram":
                histograms.add(name)
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = sample.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))  # a histogram's samples
        assert match.group(1) in typed or family in histograms, f"{match.group(1)} has no TYPE line"
        series.setdefault(match.group(1), {})[labels] = float(match.group(4))
    return series


def test_metrics_and_dashboard(service):
    a, b = TestDevice(service, KEY), TestDevice(service, KEY)
    a.task(), b.task()
    a.upload(1, update_bytes(seed=1)), b.upload(1, update_bytes(seed=2)), b.upload(9, update_bytes())
    service.app.state.services.evaluator.wait_idle()
    tick(service.app)  # the release gate has the evaluation: round 2 opens on v1
    metrics = service.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    series = parse_prometheus(metrics.text)
    assert series["pf_rounds_total"] == {(("status", "committed"),): 1.0, (("status", "abandoned"),): 0.0}
    assert series["pf_updates_accepted_total"] == {(): 2.0}
    assert series["pf_updates_refused_total"][(("reason", "unknown_round"),)] == 1.0
    assert series["pf_current_round"] == {(): 2.0} and series["pf_model_version"] == {(): 1.0}
    assert series["pf_model_accuracy"] == {(): 0.5}
    requests = series["pf_http_requests_total"]
    assert requests[(("method", "POST"), ("route", "/v1/rounds/{round_id}/updates"), ("status", "202"))] == 2

    page = service.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<svg id="accuracy-chart"' in page.text and "<polyline" in page.text
    assert '<table id="rounds">' in page.text and page.text.count("<tr><td>") == 2 + 2 + 2  # rounds, versions, releases
    assert not re.search(
        r"(src|href)=\"https?://|style=|<script>|<style", page.text
    )  # same-origin files only: offline, strict CSP
    for name in ("/dashboard.css", "/dashboard.js"):
        assert f'"{name}"' in page.text and service.get(name).status_code == 200
    assert 'id="fleet-health"' in page.text and 'id="releases"' in page.text and 'id="versions"' in page.text


def test_openapi_documents_the_api(service):
    paths = service.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/devices",
        "/v1/models/latest",
        "/v1/models/{version}",
        "/v1/checkin",
        "/v1/rounds/{round_id}/updates",
        "/v1/rounds",
        "/v1/rounds/{round_id}",
        "/healthz",
        "/metrics",
        "/v1/admin/settings",
        "/v1/admin/pause",
        "/v1/admin/resume",
        "/v1/admin/models",
        "/v1/releases",
        "/v1/admin/rollback",
        "/v1/admin/pin",
        "/v1/admin/unpin",
        "/v1/populations",
        "/v1/admin/populations",
    ):
        assert path in paths, path
    upload = paths["/v1/rounds/{round_id}/updates"]["post"]
    assert "application/octet-stream" in upload["requestBody"]["content"]


def test_an_int4_bitmap_update_is_accepted_and_the_encoding_can_be_asked_for(service, tmp_path, model_file):
    a = TestDevice(service, KEY, "a")
    assert a.task()["round_id"] == 1
    upload = a.upload(1, update_bytes(seed=1, encoding="int4-bitmap", topk_fraction=0.5))
    assert upload.status_code == 202 and upload.json()["received"] == 1
    asking = Settings(db=str(tmp_path / "x.db"), model=str(model_file), encoding="int4-bitmap", topk_fraction=0.5)
    assert asking.encoding == "int4-bitmap"

"""GET /v1/models: every version with its sha256, size and server-side evaluation, over real HTTP."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update

KEY = "k"
SHAPES = {"w": (4, 3), "b": (3,)}


def score(model_bytes: bytes) -> dict:
    """A stand-in evaluator whose numbers depend on the weights, so each version scores differently."""
    w = loads(model_bytes).tensors["w"]
    return {"accuracy": float(abs(w).mean()), "loss": float(w.sum()), "n": 123}


def serve(tmp_path, evaluate=None):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=3, shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"), model=str(model), goal=2, min_devices=1, enrollment_key=KEY, deadline=600
    )
    app = create_app(settings, evaluate=evaluate)
    return app, ServerThread(app)


def one_round(client: httpx.Client) -> list[TestDevice]:
    devices = [TestDevice(client, KEY) for _ in range(2)]
    for i, device in enumerate(devices):
        task = device.task()
        body = encode_update(
            random_delta(SHAPES, seed=i, scale=0.1),
            sample_count=10 + i,
            round_id=task["round_id"],
            base_version=task["base_version"],
        )
        assert device.upload(task["round_id"], body).status_code == 202
    return devices


def test_lists_versions_newest_first_with_their_evaluation(tmp_path):
    app, server = serve(tmp_path, evaluate=score)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        devices = one_round(client)
        app.state.services.evaluator.wait_idle()
        listing = client.get("/v1/models")  # public: no token
        assert listing.status_code == 200
        versions = listing.json()
        assert [v["version"] for v in versions] == [1, 0]
        assert [v["round_id"] for v in versions] == [1, None]  # v0 is the initial model, v1 came from round 1
        for entry in versions:
            data = client.get(f"/v1/models/{entry['version']}", headers=devices[0].headers).content
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["size_bytes"] == len(data)
            expected = score(data)
            assert entry["accuracy"] == pytest.approx(expected["accuracy"])
            assert entry["loss"] == pytest.approx(expected["loss"])
            assert entry["eval_samples"] == 123
            assert entry["num_parameters"] == 4 * 3 + 3
        assert versions[0]["accuracy"] != versions[1]["accuracy"]  # the round changed the weights
        latest = client.get("/v1/models/latest").json()
        assert {k: versions[0][k] for k in latest} == latest  # the same facts as /latest for the newest

        assert [v["version"] for v in client.get("/v1/models", params={"limit": 1}).json()] == [1]
        refused = client.get("/v1/models", params={"limit": 0})
        assert refused.status_code == 422 and "limit" in refused.json()["detail"]


def test_versions_without_evaluation_have_null_metrics(tmp_path):
    _app, server = serve(tmp_path)  # no --eval-data: nothing evaluates
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        one_round(client)
        versions = client.get("/v1/models").json()
        assert [v["version"] for v in versions] == [1, 0]
        assert all(v["accuracy"] is None and v["loss"] is None and v["eval_samples"] is None for v in versions)


def test_listing_is_in_the_openapi_schema(tmp_path):
    _app, server = serve(tmp_path)
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        schema = client.get("/openapi.json").json()
        operation = schema["paths"]["/v1/models"]["get"]
        assert "security" not in operation  # public, like /v1/models/latest
        assert [p["name"] for p in operation["parameters"]] == ["limit"]
        items = operation["responses"]["200"]["content"]["application/json"]["schema"]["items"]
        listing = schema["components"]["schemas"][items["$ref"].rsplit("/", 1)[-1]]
        assert {"version", "sha256", "created_at", "size_bytes", "accuracy", "loss"} <= set(listing["properties"])
        assert listing["properties"]["accuracy"]["description"]

"""GET /v1/models/{version}/training-step over real HTTP: the version's ONNX training step, for the
device's token only, with the sha256 as ETag and 304 on If-None-Match, cached per version; it
trains in onnxruntime exactly as the engine would; what cannot be exported is a 404 naming why."""

from __future__ import annotations

import hashlib
import json

import httpx
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import training_step_models as models  # noqa: E402

from coordinator.api import create_app  # noqa: E402
from coordinator.settings import Settings  # noqa: E402
from coordinator.testing import ServerThread, TestDevice, random_delta, stand_in_model_bytes  # noqa: E402
from engine import opr  # noqa: E402
from engine.models import build  # noqa: E402
from engine.onnx import EMITTERS  # noqa: E402
from engine.optimizer import SGD  # noqa: E402
from engine.serialize.container import loads as loads_container  # noqa: E402
from engine.serialize.modelfile import dumps, loads  # noqa: E402
from engine.trainer import Trainer  # noqa: E402
from protocol.update import encode_update  # noqa: E402

KEY = "k"


def serve(tmp_path, model_bytes: bytes, **settings):
    path = tmp_path / "m.pfmodel"
    path.write_bytes(model_bytes)
    settings = {"min_devices": 1, **settings}  # rounds of one device
    app = create_app(Settings(db=str(tmp_path / "c.db"), model=str(path), enrollment_key=KEY, **settings))
    return app, ServerThread(app)


def interface(data: bytes) -> dict:
    proto = onnx.load_from_string(data)
    return json.loads({p.key: p.value for p in proto.metadata_props}["pocketfed.training_step"])


def test_serves_the_step_with_etag_and_304_for_devices_only(tmp_path):
    app, server = serve(tmp_path, dumps(build("lenet", seed=1)), momentum=0.9)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.get("/v1/models/0/training-step").status_code == 401
        device = TestDevice(client, KEY)
        answer = client.get("/v1/models/0/training-step", headers=device.headers)
        assert answer.status_code == 200, answer.text
        step = answer.content
        assert answer.headers["ETag"] == f'"{hashlib.sha256(step).hexdigest()}"'
        meta = interface(step)
        assert meta["optimizer"]["type"] == "SGD" and meta["optimizer"]["momentum"] == 0.9  # the rounds' momentum
        assert "state/conv1.weight/momentum" in meta["inputs"]

        again = client.get(
            "/v1/models/0/training-step", headers={**device.headers, "If-None-Match": answer.headers["ETag"]}
        )
        assert again.status_code == 304 and again.content == b""
        exports = app.state.services.training_steps._cache
        assert len(exports) == 1  # the second request came from the cache

        adam = client.get("/v1/models/0/training-step?optimizer=adam", headers=device.headers)
        assert adam.status_code == 200 and interface(adam.content)["optimizer"]["type"] == "Adam"
        assert adam.headers["ETag"] != answer.headers["ETag"]
        plain = client.get("/v1/models/0/training-step?optimizer=sgd", headers=device.headers)
        assert interface(plain.content)["optimizer"]["momentum"] == 0.0

        bad = client.get("/v1/models/0/training-step?optimizer=lbfgs", headers=device.headers)
        assert bad.status_code == 422 and "optimizer" in bad.text
        missing = client.get("/v1/models/7/training-step", headers=device.headers)
        assert missing.status_code == 404 and "model version 7 does not exist" in missing.text


def test_the_served_step_trains_as_the_engine_does(tmp_path):
    """A device without the engine: model file + served step, in onnxruntime, 3 steps = the engine's 3 steps."""
    app, server = serve(tmp_path, dumps(build("lenet", seed=2)), momentum=0.9)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        device = TestDevice(client, KEY)
        model_bytes = client.get("/v1/models/0", headers=device.headers).content
        step_bytes = client.get("/v1/models/0/training-step", headers=device.headers).content
    model = loads(model_bytes)
    step = models.OnnxStep(step_bytes, model.state_dict(), 0.05)
    trainer = Trainer(model, optimizer=SGD(0.05, momentum=0.9))
    for x, y in models.batches(3):
        loss = step.step({"x": x, "label": y})
        assert abs(loss - trainer.step(x, y)[0]) <= 1e-5 * loss
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(step.tensors[name], value, rtol=1e-5, atol=1e-7)


def test_versions_of_one_architecture_share_one_export(tmp_path):
    """The step holds no weights: version 1 (after a round) is served the bytes exported for version 0."""
    model_bytes = dumps(build("lenet", seed=1))
    app, server = serve(tmp_path, model_bytes, goal=1, min_fraction=1.0)
    shapes = {n: t.shape for n, t in loads_container(model_bytes).tensors.items()}
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        device = TestDevice(client, KEY)
        first = client.get("/v1/models/0/training-step", headers=device.headers)
        task = device.task()
        body = encode_update(random_delta(shapes, seed=0), sample_count=5, round_id=task["round_id"], base_version=0)
        assert device.upload(task["round_id"], body).status_code == 202
        app.state.services.tick()
        assert client.get("/v1/models/latest").json()["version"] == 1
        second = client.get("/v1/models/1/training-step", headers=device.headers)
        assert second.status_code == 200 and second.headers["ETag"] == first.headers["ETag"]
        assert len(app.state.services.training_steps._cache) == 1


def test_a_model_without_an_onnx_step_is_a_404_naming_why(tmp_path, monkeypatch):
    app, server = serve(tmp_path, dumps(build("lenet")))
    monkeypatch.delitem(EMITTERS, opr.Relu)  # as if the engine had an operator the exporter cannot lower
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        device = TestDevice(client, KEY)
        answer = client.get("/v1/models/0/training-step", headers=device.headers)
        assert answer.status_code == 404
        assert "operator Relu has no ONNX lowering" in answer.json()["detail"]


def test_an_opaque_model_graph_is_a_404_not_a_crash(tmp_path):
    app, server = serve(tmp_path, stand_in_model_bytes(seed=0))
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        device = TestDevice(client, KEY)
        answer = client.get("/v1/models/0/training-step", headers=device.headers)
        assert answer.status_code == 404 and "has no ONNX training step" in answer.json()["detail"]
        again = client.get("/v1/models/0/training-step", headers=device.headers)
        assert again.status_code == 404 and again.json() == answer.json()  # the refusal is cached too

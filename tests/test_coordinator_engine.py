"""With the real engine: the coordinator serves `--model lenet`, devices train what it serves, and the
server evaluates every version on held-out data (--eval-data) for the dashboard."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import ServerThread, TestDevice
from engine import SGD, load_model_bytes
from engine.data import Subset, embedded_dir, load_default
from engine.trainer import Trainer
from protocol.update import encode_update

KEY = "k"


def accuracy_of(store, version, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.version(version)
        if row is not None and row.accuracy is not None:
            return row.accuracy
        time.sleep(0.05)
    raise AssertionError(f"model v{version} was not evaluated")


def test_lenet_round_with_real_training_and_server_evaluation(tmp_path):
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model="lenet",
        eval_data=str(embedded_dir()),
        goal=2,
        min_devices=1,
        enrollment_key=KEY,
        lr=0.05,
        epochs=3,
        batch_size=32,
    )
    app = create_app(settings)
    train = load_default("train")
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        before = accuracy_of(app.state.services.store, 0)
        devices = [TestDevice(client, KEY, f"phone-{i}") for i in range(2)]
        for i, device in enumerate(devices):
            task = device.task()
            model_bytes = client.get(f"/v1/models/{task['base_version']}", headers=device.headers).content
            model = load_model_bytes(model_bytes)
            trainer = Trainer(model, optimizer=SGD(task["lr"], momentum=0.9), batch_size=task["batch_size"], seed=i)
            base = {n: model.params[n].value.copy() for n in model.trainable}
            shard = Subset(train, np.arange(i * 600, (i + 1) * 600))
            result = trainer.fit(shard, epochs=task["epochs"])
            delta = {n: model.params[n].value - base[n] for n in model.trainable}
            body = encode_update(
                delta,
                sample_count=shard.size(),
                round_id=task["round_id"],
                base_version=task["base_version"],
                metrics={"loss": result["loss"]},
                encoding=task["encoding"],
            )
            assert device.upload(task["round_id"], body).status_code == 202
        assert client.get("/v1/rounds/1").json()["result_version"] == 1
        new_model = load_model_bytes(client.get("/v1/models/1", headers=devices[0].headers).content)
        assert set(new_model.trainable) == set(model.trainable)  # the engine reads what the server published
        after = accuracy_of(app.state.services.store, 1)
        assert after > before + 0.15, (before, after)
        page = client.get("/").text
        assert page.count("<circle") == 2 and f"<td>{after:.4f}</td>" in page  # the versions table
        assert f"pf_model_accuracy {after:g}" in client.get("/metrics").text


def test_coordinator_serves_an_onnx_model_as_a_pocketfed_file(tmp_path):
    pytest.importorskip("onnx")
    from engine.models import build
    from engine.onnx import export_onnx
    from engine.trainer import evaluate_model

    source = build("lenet", seed=3)
    onnx_path = tmp_path / "lenet.onnx"
    export_onnx(source, onnx_path)
    settings = Settings(
        db=str(tmp_path / "c.db"), model=str(onnx_path), enrollment_key="k", admin_token="a", goal=1, min_devices=1
    )
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        latest = client.get("/v1/models/latest").json()
        device = TestDevice(client, "k", "phone")
        served = client.get(f"/v1/models/{latest['version']}", headers=device.headers)
    assert served.status_code == 200
    model = load_model_bytes(served.content)  # a device needs no ONNX to train what was imported
    assert latest["num_parameters"] == model.num_parameters() == source.num_parameters()
    test = Subset(load_default("test"), np.arange(200))
    assert evaluate_model(model, test)["accuracy"] == evaluate_model(source, test)["accuracy"]

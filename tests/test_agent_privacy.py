"""Only deltas leave the device: record every byte an agent sends during a full round and look
for its samples, labels and file names in them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
from test_agent_harness import Coordinator, device_token, finish, make_shards, recorder, start_agent

from engine.data import load_default, preprocessing_for
from engine.serialize.container import loads
from protocol.messages import FederatedMetrics
from protocol.update import decode_update

ALLOWED_METADATA = {
    "format",
    "format_version",
    "encoding",
    "sparse",
    "sample_count",
    "round_id",
    "base_version",
    "metrics",
    "tensors",
}


def model_file(container) -> SimpleNamespace:
    """What preprocessing_for reads from a model: its metadata."""
    return SimpleNamespace(metadata=container.metadata)


ALLOWED_METRICS = {"loss_before", "loss_after", "acc_before", "acc_after", "train_loss", "steps", "delta_norm"}


def test_a_full_round_sends_no_sample_label_or_file_name(tmp_path):
    [data_path], [indices] = make_shards(tmp_path, 1, 120, partition="iid")
    with Coordinator(tmp_path, goal=1) as coordinator, recorder(coordinator.port) as proxy:
        out, _ = finish(start_agent(proxy.url, data_path, tmp_path / "state", "--once"), timeout=180)
        record = json.loads(out.strip().splitlines()[-1])
        token = device_token(tmp_path / "state")
        model = loads(coordinator.get(f"/v1/models/{record['version']}", token).content, kind="model")
        rounds = coordinator.get("/v1/rounds").json()
    assert record["round"] == rounds[-1]["id"] and rounds[-1]["received"] == 1  # the round really happened

    sent = proxy.sent
    requests = proxy.requests()
    routes = [(r.method, r.path.split("?")[0]) for r in requests]
    uploads = [r for r in requests if r.path.endswith("/updates")]
    assert ("POST", "/v1/devices") in routes and ("POST", "/v1/checkin") in routes and len(uploads) == 1
    for req in requests:  # every body is a known JSON control message, an update, or empty
        if req.path == "/v1/devices":
            assert set(json.loads(req.body)) == {"enrollment_key", "name"}
        elif req.path == "/v1/checkin":
            body = json.loads(req.body)
            assert set(body) == {"eligible", "num_samples", "task_kinds"}
            assert body["task_kinds"] == ["train", "evaluate", "personalize"]
        elif req.path == "/v1/federated-metrics":  # an evaluate or personalize task: aggregates only
            assert set(json.loads(req.body)) <= set(FederatedMetrics.__dataclass_fields__)
        elif req.path.endswith("/updates"):
            assert req.headers["content-type"] == "application/octet-stream"
        else:
            assert req.method == "GET" and req.body == b"", req.path
    body = uploads[0].body
    container = loads(body, kind="update")
    trainable = set(model.metadata["trainable"])
    assert set(container.tensors) == trainable  # dense: one tensor per parameter, nothing else
    assert set(container.metadata) <= ALLOWED_METADATA
    assert set(container.metadata["metrics"]) <= ALLOWED_METRICS  # aggregates only, never per-sample
    update = decode_update(body, expected={n: model.tensors[n].shape for n in trainable})
    assert update.sample_count == record["samples"]

    # The raw data in every form it exists on the device, searched for in every byte sent.
    train = load_default("train")
    with np.load(data_path, allow_pickle=False) as local:
        x, y = local["x"], local["y"]
    assert body in sent  # positive control: the search does find what was sent
    fed = preprocessing_for(model_file(model)).apply(x)  # the float32 inputs the model trained on
    for i in range(0, len(x), 7):
        assert x[i].tobytes() not in sent, f"sample {i} (uint8 pixels) was sent"
        assert fed[i].tobytes() not in sent, f"sample {i} (float32 model input) was sent"
        assert fed[i, 0, 10].tobytes() not in sent, f"a row of sample {i} was sent"
        assert train.raw[indices[i]].tobytes()[28 * 10 : 28 * 12] not in sent, f"raw pixels of {i} were sent"
    for dtype in (np.int64, np.int32, np.uint8, np.float32):
        assert y[:12].astype(dtype).tobytes() not in sent, f"the label sequence ({dtype.__name__}) was sent"
    assert json.dumps(y[:12].tolist()).encode() not in sent
    for name in (str(data_path), data_path.name, "private-photos", str(tmp_path)):
        assert name.encode() not in sent, f"{name!r} was sent"

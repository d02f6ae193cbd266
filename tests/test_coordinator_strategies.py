"""Server aggregation equals its formula, computed independently here with numpy, over real HTTP."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.strategies import STRATEGIES, RunningSum, Strategy, make_strategy
from coordinator.testing import FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update

KEY = "k"
SHAPES = {"w": (4, 3), "b": (3,), "head": (3, 2)}
SAMPLES = [(10, 30), (7, 1)]  # sample counts of the two devices in rounds 1 and 2


def serve(tmp_path, **options):
    tmp_path.mkdir(exist_ok=True)
    model = tmp_path / "m.pfmodel"
    if not model.exists():
        model.write_bytes(stand_in_model_bytes(seed=3, shapes=SHAPES))
    options = {"goal": 2, "min_devices": 1, **options}
    options = {"influence_bound": False, **options}  # these tests check each algorithm's exact math
    settings = Settings(db=str(tmp_path / "c.db"), model=str(model), enrollment_key=KEY, deadline=1000, **options)
    return ServerThread(create_app(settings, clock=FakeClock()))


def weights(client, device, version):
    return loads(client.get(f"/v1/models/{version}", headers=device.headers).content, kind="model").tensors


def play_round(client, devices, round_no):
    """Both devices take the task and upload a seeded delta; returns the deltas sent."""
    deltas = []
    for i, device in enumerate(devices):
        task = device.task()
        assert task["round_id"] == round_no
        delta = random_delta(SHAPES, seed=100 * round_no + i, scale=0.1)
        body = encode_update(
            delta, sample_count=SAMPLES[round_no - 1][i], round_id=round_no, base_version=task["base_version"]
        )
        assert device.upload(round_no, body).status_code == 202
        deltas.append(delta)
    return deltas


def weighted_mean(deltas, counts):
    return {
        k: sum(n * d[k].astype(np.float64) for d, n in zip(deltas, counts, strict=True)) / sum(counts) for k in SHAPES
    }


def run_two_rounds(tmp_path, restart_between=False, **options):
    """Play two rounds (optionally restarting the coordinator in between); return (w0, w1, w2, deltas)."""
    with serve(tmp_path, **options) as server, httpx.Client(base_url=server.url) as client:
        devices = [TestDevice(client, KEY) for _ in range(2)]
        w0 = weights(client, devices[0], 0)
        deltas1 = play_round(client, devices, 1)
        if not restart_between:
            deltas2 = play_round(client, devices, 2)
            return w0, weights(client, devices[0], 1), weights(client, devices[0], 2), deltas1, deltas2
    with serve(tmp_path, **options) as server, httpx.Client(base_url=server.url) as client:
        for d in devices:
            d.client = client
        deltas2 = play_round(client, devices, 2)
        return w0, weights(client, devices[0], 1), weights(client, devices[0], 2), deltas1, deltas2


def assert_close(actual, expected):
    for k in SHAPES:
        np.testing.assert_allclose(actual[k], expected[k], rtol=0, atol=1e-6, err_msg=k)


def test_fedavg_is_the_sample_weighted_mean(tmp_path):
    w0, w1, w2, d1, d2 = run_two_rounds(tmp_path, strategy="fedavg", server_lr=0.5)
    mean1 = weighted_mean(d1, SAMPLES[0])
    assert_close(w1, {k: w0[k] + 0.5 * mean1[k] for k in SHAPES})
    mean2 = weighted_mean(d2, SAMPLES[1])
    assert_close(w2, {k: w1[k] + 0.5 * mean2[k] for k in SHAPES})


def test_fedprox_sends_mu_and_averages_like_fedavg(tmp_path):
    with (
        serve(tmp_path, strategy="fedprox", fedprox_mu=0.25) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        devices = [TestDevice(c, KEY) for _ in range(2)]
        assert devices[0].task()["fedprox_mu"] == 0.25
        w0 = weights(c, devices[0], 0)
        d1 = play_round(c, devices, 1)
        mean = weighted_mean(d1, SAMPLES[0])
        assert_close(weights(c, devices[0], 1), {k: w0[k] + mean[k] for k in SHAPES})
    with serve(tmp_path / "other", strategy="fedavg") as server, httpx.Client(base_url=server.url) as c:
        assert TestDevice(c, KEY).task()["fedprox_mu"] == 0.0


@pytest.mark.parametrize("restart", [False, True], ids=["one-process", "restart-between-rounds"])
def test_fedavgm_follows_server_momentum(tmp_path, restart):
    lr, beta = 0.7, 0.9
    w0, w1, w2, d1, d2 = run_two_rounds(
        tmp_path, restart_between=restart, strategy="fedavgm", server_lr=lr, server_momentum=beta
    )
    v1 = weighted_mean(d1, SAMPLES[0])
    expected1 = {k: (w0[k] + lr * v1[k]).astype(np.float32) for k in SHAPES}
    assert_close(w1, expected1)
    v2 = {k: beta * v1[k] + weighted_mean(d2, SAMPLES[1])[k] for k in SHAPES}
    assert_close(w2, {k: expected1[k] + lr * v2[k] for k in SHAPES})


def test_fedadam_follows_reddi_et_al(tmp_path):
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    w0, w1, w2, d1, d2 = run_two_rounds(tmp_path, strategy="fedadam", server_lr=lr, beta1=b1, beta2=b2, tau=tau)
    g1, g2 = weighted_mean(d1, SAMPLES[0]), weighted_mean(d2, SAMPLES[1])
    m1 = {k: (1 - b1) * g1[k] for k in SHAPES}
    v1 = {k: (1 - b2) * g1[k] ** 2 for k in SHAPES}
    expected1 = {k: (w0[k] + lr * m1[k] / (np.sqrt(v1[k]) + tau)).astype(np.float32) for k in SHAPES}
    assert_close(w1, expected1)
    m2 = {k: b1 * m1[k] + (1 - b1) * g2[k] for k in SHAPES}
    v2 = {k: b2 * v1[k] + (1 - b2) * g2[k] ** 2 for k in SHAPES}
    assert_close(w2, {k: expected1[k] + lr * m2[k] / (np.sqrt(v2[k]) + tau) for k in SHAPES})


def test_running_sum_round_trips_and_streams():
    running = RunningSum()
    deltas = [random_delta(SHAPES, seed=s) for s in range(5)]
    for i, d in enumerate(deltas):
        running = RunningSum.from_bytes(running.to_bytes())  # as the server does between updates
        running.add(d, i + 1)
    assert running.count == 5 and running.total_weight == 15
    expected = weighted_mean(deltas, [1, 2, 3, 4, 5])
    for k in SHAPES:
        np.testing.assert_allclose(running.mean()[k], expected[k], atol=1e-12)
        assert running.sums[k].shape == SHAPES[k]  # O(model size), whatever the number of updates
    with pytest.raises(ValueError, match="strategy 'bulyan' is not one of"):
        make_strategy({"strategy": "bulyan"})


class CoordinateMedian(Strategy):
    """A non-streaming strategy as robust ones will be: it needs every delta of the round at once."""

    name = "test-median"
    streaming = False

    def combine(self, updates):
        return {k: np.median(np.stack([d[k] for d, _ in updates]), axis=0) for k in updates[0][0]}

    def step(self, base, delta, state):
        return {k: base[k] + self.server_lr * d for k, d in delta.items()}, state


def test_non_streaming_strategies_get_every_update(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, CoordinateMedian.name, CoordinateMedian)
    with (
        serve(tmp_path, strategy="test-median", goal=3) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        devices = [TestDevice(client, KEY) for _ in range(3)]
        w0 = weights(client, devices[0], 0)
        deltas = [random_delta(SHAPES, seed=i, scale=0.1) for i in range(3)]
        deltas[2] = {k: v * 1000 for k, v in deltas[2].items()}  # an outlier the median ignores
        for device, delta in zip(devices, deltas, strict=True):
            device.task()
            body = encode_update(delta, sample_count=4, round_id=1, base_version=0)
            assert device.upload(1, body).status_code == 202
        median = {k: np.median(np.stack([d[k] for d in deltas]), axis=0) for k in SHAPES}
        assert_close(weights(client, devices[0], 1), {k: w0[k] + median[k] for k in SHAPES})

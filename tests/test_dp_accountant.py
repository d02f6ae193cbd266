"""Client-level DP on the server: clipping, noise, adaptive clipping and the accountant's epsilon,
which must equal dp-accounting's own computation for the same noise, sampling rate and steps."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting", reason="the dp extra (dp-accounting) is not installed")

from coordinator.api import create_app  # noqa: E402
from coordinator.service import privacy  # noqa: E402
from coordinator.settings import Settings  # noqa: E402
from coordinator.strategies import dp  # noqa: E402
from coordinator.testing import FakeClock, ServerThread, TestDevice, stand_in_model_bytes  # noqa: E402
from engine.serialize.container import loads  # noqa: E402
from protocol.deltas import clip_by_l2  # noqa: E402
from protocol.update import encode_update  # noqa: E402

SHAPES = {"w": (4000,), "b": (4,)}


def reference_epsilon(q: float, z: float, steps: int, delta: float) -> float:
    """dp-accounting used directly: `steps` compositions of a Poisson-subsampled Gaussian."""
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q, z, steps, delta", [(0.01, 1.1, 100, 1e-5), (0.2, 0.8, 7, 1e-6), (1.0, 2.0, 3, 1e-5)])
def test_epsilon_equals_dp_accounting(q, z, steps, delta):
    ours = privacy.epsilon([(q, z)] * steps, delta)
    assert ours == pytest.approx(reference_epsilon(q, z, steps, delta), rel=1e-9)
    assert 0 < ours < math.inf


def test_adaptive_split_costs_the_same_as_one_query():
    """Andrew et al. eq.: 1/z^2 = 1/z_delta^2 + 1/(2 sigma_b)^2."""
    z, sigma_b = 1.0, 2.0
    z_delta = dp.delta_noise_multiplier(z, True, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with pytest.raises(ValueError, match="dp_count_stddev"):
        dp.delta_noise_multiplier(1.0, True, 0.4)


def serve(tmp_path, **options):
    tmp_path.mkdir(parents=True, exist_ok=True)
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=2, shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        enrollment_key="k",
        deadline=1000,
        goal=2,
        min_devices=1,
        dp_population=40,
        dp_delta=1e-5,
        enroll_per_address=10_000,  # Poisson admission (q = 1/20): fresh devices until enough are admitted
        **options,
    )
    return ServerThread(create_app(settings, clock=FakeClock()))


def weights(client, device, version):
    return loads(client.get(f"/v1/models/{version}", headers=device.headers).content, kind="model").tensors


def admitted(client, device):
    """Poisson admission (q = goal / population = 2/40): the device and its task if it was sampled for
    the open round, else a freshly enrolled one that was."""
    for _ in range(400):
        answer = device.checkin().json()
        if answer["status"] == "task":
            return device, answer["task"]
        assert "not sampled" in answer["reason"], answer
        device = TestDevice(client, "k")
    raise AssertionError("no device was admitted in 400 check-ins")


def play_round(client, devices, deltas, samples=(5, 500)):
    for device, delta, n in zip(devices, deltas, samples, strict=True):
        device, task = admitted(client, device)
        body = encode_update(delta, sample_count=n, round_id=task["round_id"], base_version=task["base_version"])
        assert device.upload(task["round_id"], body).status_code == 202


def deltas_for(seed):
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(2)]


def test_clipping_and_equal_weights_with_negligible_noise(tmp_path):
    with (
        serve(tmp_path, dp_noise_multiplier=1e-9, dp_clip_norm=0.5) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        devices = [TestDevice(client, "k") for _ in range(2)]
        w0 = weights(client, devices[0], 0)
        deltas = deltas_for(0)
        play_round(client, devices, deltas)
        clipped = [clip_by_l2(d, 0.5)[0] for d in deltas]
        expected = {k: w0[k] + (clipped[0][k] + clipped[1][k]) / 2 for k in SHAPES}  # 5 vs 500 samples ignored
        w1 = weights(client, devices[0], 1)
        for k in SHAPES:
            np.testing.assert_allclose(w1[k], expected[k], atol=1e-6)


def test_noise_std_and_epsilon_per_round_everywhere(tmp_path):
    z, clip_norm = 1.0, 1.0
    with (
        serve(tmp_path, dp_noise_multiplier=z, dp_clip_norm=clip_norm) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        devices = [TestDevice(client, "k") for _ in range(2)]
        for round_id in (1, 2, 3):
            before = weights(client, devices[0], round_id - 1)
            deltas = deltas_for(round_id)
            play_round(client, devices, deltas)
            after = weights(client, devices[0], round_id)
            clipped = [clip_by_l2(d, clip_norm)[0] for d in deltas]
            noise = after["w"] - before["w"] - (clipped[0]["w"] + clipped[1]["w"]) / 2
            assert np.std(noise) == pytest.approx(z * clip_norm / 2, rel=0.06)  # 4000 samples: ~1.1% s.e.
        rounds = {r["id"]: r for r in client.get("/v1/rounds").json()}
        q = 2 / 40
        for steps in (1, 2, 3):
            assert rounds[steps]["epsilon"] == pytest.approx(reference_epsilon(q, z, steps, 1e-5), rel=1e-9)
            assert rounds[steps]["dp_sampling_rate"] == q and rounds[steps]["dp_clip_norm"] == clip_norm
        assert client.get("/v1/rounds/3").json()["epsilon"] == rounds[3]["epsilon"]
        assert rounds[4]["status"] == "open" and rounds[4]["epsilon"] is None
        assert f"{rounds[3]['epsilon']:.3f}" in client.get("/").text
        metrics = client.get("/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith("pf_dp_epsilon "))
        assert float(line.split()[1]) == pytest.approx(rounds[3]["epsilon"], rel=1e-5)


def test_budget_stops_rounds_or_warns(tmp_path):
    z, q = 1.0, 2 / 40
    budget = (reference_epsilon(q, z, 2, 1e-5) + reference_epsilon(q, z, 3, 1e-5)) / 2  # room for 2 rounds
    with (
        serve(tmp_path / "stop", dp_noise_multiplier=z, dp_epsilon_budget=budget) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        devices = [TestDevice(client, "k") for _ in range(2)]
        for seed in (1, 2):
            play_round(client, devices, deltas_for(seed))
        rounds = client.get("/v1/rounds").json()
        assert [r["status"] for r in rounds] == ["committed", "committed"]  # no third round opened
        answer = devices[0].checkin().json()
        assert answer["status"] == "retry" and "privacy budget" in answer["reason"]
        assert "pf_dp_budget_exhausted 1" in client.get("/metrics").text
        assert "privacy budget" in client.get("/").text
    with (
        serve(tmp_path / "warn", dp_noise_multiplier=z, dp_epsilon_budget=budget, dp_on_budget="warn") as server,
        httpx.Client(base_url=server.url) as client,
    ):
        devices = [TestDevice(client, "k") for _ in range(2)]
        for seed in (1, 2, 3):
            play_round(client, devices, deltas_for(seed))
        rounds = client.get("/v1/rounds").json()
        assert rounds[0]["status"] == "open" and rounds[1]["epsilon"] > budget


def test_adaptive_clipping_moves_toward_the_quantile(tmp_path):
    # both updates have norm ~63 > C = 0.1: the unclipped fraction is 0, so C grows by exp(0.2 * 0.5)
    with (
        serve(tmp_path, dp_noise_multiplier=0.01, dp_count_stddev=0.006, dp_adaptive_clip=True) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        devices = [TestDevice(client, "k") for _ in range(2)]
        play_round(client, devices, deltas_for(1))
        play_round(client, devices, deltas_for(2))
        rounds = {r["id"]: r for r in client.get("/v1/rounds").json()}
        assert rounds[1]["dp_clip_norm"] == 0.1
        assert rounds[2]["dp_clip_norm"] == pytest.approx(0.1 * math.exp(0.1), rel=3e-3)  # count noise: 6e-4 s.d.
        assert rounds[3]["dp_clip_norm"] == pytest.approx(0.1 * math.exp(0.2), rel=5e-3)


def test_dp_refuses_a_robust_strategy():
    with pytest.raises(ValueError, match="mean-based strategy"):
        Settings(dp_noise_multiplier=1.0, strategy="median")

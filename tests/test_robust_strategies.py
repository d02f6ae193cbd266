"""Robust aggregation against hostile devices: numbers checked by hand, then through the real server."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.strategies import CoordinateMedian, Krum, MultiKrum, TrimmedMean, make_strategy
from coordinator.strategies.krum import krum_scores
from coordinator.testing import FakeClock, ServerThread, TestDevice, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.deltas import clip_by_l2 as clip
from protocol.update import encode_update


def ups(*rows, weights=None):
    """Updates with one tensor "w" each; rows of plain numbers."""
    weights = weights or [1] * len(rows)
    return [({"w": np.array(r, np.float64)}, n) for r, n in zip(rows, weights, strict=True)]


def test_median_per_coordinate_ignores_sample_counts():
    out = CoordinateMedian().combine(ups([1, 10], [2, -5], [100, 0], weights=[1, 1, 10**6]))
    np.testing.assert_array_equal(out["w"], [2, 0])
    # even count: the mean of the two middle values
    out = CoordinateMedian().combine(ups([1], [2], [3], [1000]))
    np.testing.assert_array_equal(out["w"], [2.5])


def test_trimmed_mean_cuts_beta_from_each_end():
    rows = [[1], [2], [3], [4], [100]]
    # beta 0.2 of 5 updates: floor(1.0) = 1 cut from each end -> mean(2, 3, 4) = 3
    np.testing.assert_array_equal(TrimmedMean(trim_beta=0.2).combine(ups(*rows))["w"], [3.0])
    # beta 0.1: floor(0.5) = 0 cut -> the plain mean 110 / 5 = 22
    np.testing.assert_array_equal(TrimmedMean(trim_beta=0.1).combine(ups(*rows))["w"], [22.0])
    # per coordinate: a value extreme in one coordinate is cut there only
    out = TrimmedMean(trim_beta=0.25).combine(ups([0, 9], [1, 1], [2, 2], [-50, 3]))
    np.testing.assert_array_equal(out["w"], [0.5, 2.5])
    with pytest.raises(ValueError, match="trim_beta"):
        TrimmedMean(trim_beta=0.5)


def test_krum_scores_and_selection_by_hand():
    # four 1-D updates at 0, 1, 3 and 10; f = 1 -> n - f - 2 = 1 nearest neighbour
    updates = [{"w": np.array([x])} for x in (0.0, 1.0, 3.0, 10.0)]
    # squared distances: 0->1: 1, 1->0: 1, 3->1: 4, 10->3: 49
    np.testing.assert_allclose(krum_scores(updates, f=1), [1, 1, 4, 49])
    # f = 0 -> 2 neighbours: 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 10: 49+81=130
    np.testing.assert_allclose(krum_scores(updates, f=0), [10, 5, 13, 130])
    pairs = [(u, 1) for u in updates]
    np.testing.assert_array_equal(Krum(krum_f=0).combine(pairs)["w"], [1.0])
    # Multi-Krum m = 2, f = 0 keeps the two best scores (1 and 0) and averages them
    assert MultiKrum(krum_f=0, krum_m=2).selected(pairs) == [1, 0]
    np.testing.assert_array_equal(MultiKrum(krum_f=0, krum_m=2).combine(pairs)["w"], [0.5])


def test_krum_uses_all_tensors_of_an_update():
    honest = [{"a": np.array([0.1 * i]), "b": np.zeros((2, 2))} for i in range(4)]
    liar = {"a": np.array([0.15]), "b": np.full((2, 2), 5.0)}  # close in "a", far in "b"
    pairs = [(u, 1) for u in [*honest, liar]]
    assert 4 not in MultiKrum(krum_f=1, krum_m=3).selected(pairs)


def test_make_strategy_passes_the_robust_options():
    assert make_strategy({"strategy": "trimmed_mean", "trim_beta": 0.3}).beta == 0.3
    mk = make_strategy({"strategy": "multikrum", "krum_f": 3, "krum_m": 7})
    assert (mk.f, mk.m, mk.streaming) == (3, 7, False)
    assert make_strategy({"strategy": "krum", "krum_f": 2, "krum_m": 9}).m == 1


def test_norm_bounding_clip_by_hand():
    delta = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}  # norm 5
    clipped, norm = clip(delta, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-6)
    same, _ = clip(delta, 10.0)  # within the bound: untouched
    np.testing.assert_array_equal(same["a"], delta["a"])


SHAPES = {"w": (3,), "b": (2,)}


def serve(tmp_path, **options):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=5, shapes=SHAPES))
    options = {"influence_bound": False, **options}  # these tests check each algorithm's exact math
    settings = Settings(db=str(tmp_path / "c.db"), model=str(model), enrollment_key="k", deadline=1000, **options)
    return ServerThread(create_app(settings, clock=FakeClock()))


def play(client, deltas, samples):
    devices = [TestDevice(client, "k") for _ in deltas]
    w0 = loads(client.get("/v1/models/0", headers=devices[0].headers).content, kind="model").tensors
    for device, delta, n in zip(devices, deltas, samples, strict=True):
        task = device.task()
        body = encode_update(delta, sample_count=n, round_id=task["round_id"], base_version=0)
        assert device.upload(task["round_id"], body).status_code == 202
    w1 = loads(client.get("/v1/models/1", headers=devices[0].headers).content, kind="model").tensors
    return w0, w1


def f32(*values):
    return np.array(values, np.float32)


def test_server_trimmed_mean_with_norm_bound_end_to_end(tmp_path):
    """Three honest deltas and a huge liar: norm bounding clips the liar to norm 1 first,
    then the trimmed mean (beta 0.25 of 4 -> one cut per end) drops it per coordinate."""
    deltas = [
        {"w": f32(0.1, 0.2, 0.3), "b": f32(0.0, 0.1)},
        {"w": f32(0.2, 0.1, 0.3), "b": f32(0.1, 0.0)},
        {"w": f32(0.3, 0.3, 0.1), "b": f32(0.1, 0.1)},
        {"w": f32(-900, 900, 0), "b": f32(0, 0)},
    ]
    with (
        serve(tmp_path, goal=4, strategy="trimmed_mean", trim_beta=0.25, norm_bound=1.0) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        w0, w1 = play(client, deltas, [5, 5, 5, 10**5])
        liar = [-900 / math.sqrt(2 * 900**2), 900 / math.sqrt(2 * 900**2), 0]  # clipped to norm 1
        cols = np.sort(np.array([d["w"] for d in deltas[:3]] + [liar], np.float64), axis=0)
        np.testing.assert_allclose(w1["w"], w0["w"] + cols[1:3].mean(axis=0), rtol=1e-5, atol=1e-6)
        # hand check of the first coordinate: values 0.1, 0.2, 0.3, -0.707 -> keep 0.1, 0.2 -> 0.15
        assert w1["w"][0] == pytest.approx(w0["w"][0] + 0.15, abs=1e-6)
        detail = client.get("/v1/rounds/1").json()
        assert detail["strategy"] == "trimmed_mean" and detail["config"]["norm_bound"] == 1.0


def test_server_krum_picks_the_central_update(tmp_path):
    deltas = [
        {"w": f32(0.1, 0.1, 0.1), "b": f32(0, 0)},
        {"w": f32(0.12, 0.1, 0.1), "b": f32(0, 0)},
        {"w": f32(0.1, 0.11, 0.1), "b": f32(0, 0)},
        {"w": f32(5, -5, 5), "b": f32(5, 5)},
        {"w": f32(-5, 5, -5), "b": f32(-5, 5)},
    ]
    with serve(tmp_path, goal=5, strategy="krum", krum_f=1) as server, httpx.Client(base_url=server.url) as client:
        w0, w1 = play(client, deltas, [1, 1, 1, 1, 1])
        # f = 1 -> two neighbours. Squared distances: d01 = 4e-4, d02 = 1e-4, d12 = 5e-4, so the
        # scores are 5e-4 (update 0), 9e-4 (1), 6e-4 (2) and huge for the liars: update 0 wins
        np.testing.assert_allclose(w1["w"], w0["w"] + deltas[0]["w"], rtol=1e-6)
        np.testing.assert_allclose(w1["b"], w0["b"], rtol=1e-6)

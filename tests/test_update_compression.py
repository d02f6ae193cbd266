"""Clipping, Gaussian noise, and top-k with error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.deltas import TopK, add_gaussian_noise, clip_by_l2, global_l2_norm
from protocol.update import decode_update, encode_update


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}


def test_clip_scales_to_max_norm_and_reports_original():
    d = delta(0)
    norm = global_l2_norm(d)
    clipped, reported = clip_by_l2(d, norm / 4)
    assert reported == pytest.approx(norm, rel=1e-6)
    assert global_l2_norm(clipped) == pytest.approx(norm / 4, rel=1e-5)
    np.testing.assert_allclose(clipped["a"] * 4, d["a"], rtol=1e-5)  # direction kept
    unchanged, _ = clip_by_l2(d, norm * 2)
    np.testing.assert_array_equal(unchanged["b"], d["b"])
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_l2(d, 0)


def test_gaussian_noise_has_the_requested_std_and_is_seeded():
    zeros = {"w": np.zeros((200, 200), np.float32)}
    noisy = add_gaussian_noise(zeros, 0.3, np.random.default_rng(1))
    assert noisy["w"].std() == pytest.approx(0.3, rel=0.02)
    assert abs(noisy["w"].mean()) < 0.01
    np.testing.assert_array_equal(noisy["w"], add_gaussian_noise(zeros, 0.3, np.random.default_rng(1))["w"])
    assert np.all(zeros["w"] == 0)  # the input is untouched


def test_topk_keeps_fraction_and_conserves_mass():
    sparse, residual = TopK(0.1).compress(delta(0))
    assert np.count_nonzero(sparse["a"]) == 60 and np.count_nonzero(sparse["b"]) == 1
    for name, value in delta(0).items():
        np.testing.assert_allclose(sparse[name] + residual[name], value, atol=1e-6)
        assert np.abs(sparse[name][sparse[name] != 0]).min() >= np.abs(residual[name]).max()


def test_error_feedback_sums_to_full_delta_over_rounds():
    topk, residual = TopK(0.05), None
    total_full = {"a": np.zeros((20, 30)), "b": np.zeros(7)}
    total_sent = {"a": np.zeros((20, 30)), "b": np.zeros(7)}
    for round_no in range(8):
        full = delta(round_no)
        sparse, residual = topk.compress(full, residual)
        # What the server receives is the decoded wire bytes, not the in-memory array.
        wire = decode_update(
            encode_update(sparse, sample_count=10, round_id=round_no, base_version=0, topk_fraction=0.05)
        ).delta
        for name in full:
            np.testing.assert_array_equal(wire[name], sparse[name])
            total_full[name] += full[name]
            total_sent[name] += wire[name]
    for name in total_full:
        np.testing.assert_allclose(total_sent[name] + residual[name], total_full[name], atol=1e-4)
        # and the residual really carried something (the test would pass trivially otherwise)
        assert np.abs(residual[name]).sum() > 0.1
    # without error feedback the dropped mass is simply lost
    lost = sum(np.abs(full - TopK(0.05).compress({"a": full})[0]["a"]).sum() for full in [delta(0)["a"]])
    assert lost > 1.0


def test_topk_rejects_bad_fraction():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            TopK(bad)

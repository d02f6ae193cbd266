"""Secure aggregation building blocks: quantization, Shamir, keys/AEAD/PRG, the neighbour graph,
Skellam noise and the round config (protocol/secagg)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from secagg_helpers import entropy, lenet_deltas

from protocol.secagg import SecAggConfig, SecAggError, crypto, flatten, graph, noise, shamir, unflatten
from protocol.secagg.quantize import SIGNED_LIMIT, Quantizer, from_field, to_field

# ---------------------------------------------------------------- quantization


def test_deterministic_quantization_round_trips_within_half_a_step():
    q = Quantizer(rounding="deterministic")
    x = lenet_deltas(4)[0].astype(np.float64)
    ints, weight = q.encode(x, 600, np.random.default_rng(0))
    assert weight == 600 and ints[0] == 600
    total, weighted_sum = q.decode(to_field(ints))
    assert total == 600
    # weighted_sum estimates w * x; one step in those units is W / S
    assert np.max(np.abs(weighted_sum - 600 * x)) <= 0.5 * q.max_weight / q.scale + 1e-12


def test_stochastic_rounding_is_unbiased_where_nearest_rounding_is_not():
    levels = 2**22
    q_sto, q_det = Quantizer(levels=levels), Quantizer(levels=levels, rounding="deterministic")
    step = 1.0 / q_sto.scale
    x = np.full(100_000, (1234 + 0.3) * step)  # every value 0.3 steps above a grid point
    sto, _ = q_sto.encode(x, 1000, np.random.default_rng(1))
    det, _ = q_det.encode(x, 1000, np.random.default_rng(1))
    exact = x * q_sto.scale
    assert abs(np.mean(sto[1:] - exact)) < 0.01  # std of the mean: sqrt(0.21 / 1e5) = 0.0015
    assert abs(np.mean(det[1:] - exact) + 0.3) < 1e-6  # nearest rounding is 0.3 steps low, always
    assert set(np.unique(sto[1:] - 1234)) == {0, 1}


def test_values_are_clipped_and_weights_capped():
    q = Quantizer(clipping_range=8.0, max_weight=1000)
    ints, weight = q.encode(np.array([100.0, -100.0, 0.5]), 5000, np.random.default_rng(0))
    assert weight == 1000
    assert ints[1] == q.entry_bound and ints[2] == -q.entry_bound
    small, w = q.encode(np.array([0.5]), 10, np.random.default_rng(0))
    assert w == 10 and abs(small[1] - 0.5 * 10 / 1000 * q.scale) <= 1  # scaled by w / W
    with pytest.raises(SecAggError, match="sample_count"):
        q.encode(np.array([0.5]), 0, np.random.default_rng(0))
    with pytest.raises(SecAggError, match="NaN"):
        q.encode(np.array([np.nan]), 1, np.random.default_rng(0))


def test_field_encoding_wraps_signed_values():
    values = np.array([0, 1, -1, SIGNED_LIMIT, -SIGNED_LIMIT - 1, -12345])
    field = to_field(values)
    assert field.dtype == np.uint32 and field[2] == 2**32 - 1
    assert np.array_equal(from_field(field), values)


def test_the_overflow_bound_is_exact_and_asserted():
    q = Quantizer()  # Flower's defaults: c = 8, 2^22 levels
    assert q.max_cohort() == 1023
    worst = to_field(np.full(3, q.entry_bound))
    ok = np.zeros(3, np.uint32)
    for _ in range(1023):
        ok += worst  # uint32 arithmetic: the sum modulo 2^32, as the server computes it
    assert np.all(from_field(ok) == 1023 * q.entry_bound)  # 1023 devices at the bound still decode
    assert np.all(from_field(ok + worst) < 0)  # the 1024th wraps around: that is what the check prevents
    SecAggConfig.create(0, 1023, 10, neighbours=2, threshold=2, dropout_tolerance=0.0)
    with pytest.raises(SecAggError, match="at most 1023 devices"):
        SecAggConfig.create(0, 1024, 10, neighbours=2, threshold=2, dropout_tolerance=0.0)


def test_flatten_and_unflatten_agree_on_order():
    delta = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([7.0, 8.0], np.float32)}
    flat = flatten(delta)
    assert flat.tolist() == [7.0, 8.0, 0, 1, 2, 3, 4, 5]
    back = unflatten(flat, {"a": (2,), "b": (2, 3)})
    assert all(np.array_equal(back[k], delta[k]) for k in delta)
    with pytest.raises(SecAggError, match="does not fit"):
        unflatten(flat, {"a": (3,)})


# ---------------------------------------------------------------- Shamir


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(0)
    for _ in range(40):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_every_32_byte_secret():
    assert shamir.PRIME > 2**256 and _is_probable_prime(shamir.PRIME)
    assert not _is_probable_prime(2**256 + 295)


def test_any_threshold_of_shares_recovers_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 5, range(1, 10), entropy(1))
    rng = random.Random(2)
    for _ in range(10):
        holders = rng.sample(sorted(shares), rng.randint(5, 9))
        assert shamir.reconstruct([(h, shares[h]) for h in holders], 5) == secret
    with pytest.raises(shamir.ShamirError, match="4 distinct shares, 5 needed"):
        shamir.reconstruct([(h, shares[h]) for h in (1, 2, 3, 4)], 5)
    # t - 1 shares interpolated as if t were smaller give something else
    assert shamir.reconstruct([(h, shares[h]) for h in (1, 2, 3, 4)], 4) != secret
    # the all-0xff secret (the largest) survives too
    top = b"\xff" * 32
    assert shamir.reconstruct(shamir.split(top, 3, [1, 2, 3]).items(), 3) == top


def test_duplicate_and_inconsistent_shares_are_refused_by_name():
    shares = shamir.split(b"k" * 32, 3, [1, 2, 3, 4, 5], entropy(3))
    pairs = list(shares.items())
    assert shamir.reconstruct(pairs + [pairs[0]], 3) == b"k" * 32  # an identical duplicate is harmless
    other = (int.from_bytes(shares[2], "big") + 1).to_bytes(33, "big")
    with pytest.raises(shamir.ShamirError, match="holder 2 gave two different shares"):
        shamir.reconstruct(pairs + [(2, other)], 3)
    with pytest.raises(shamir.ShamirError, match="holder 5 does not lie on the polynomial"):
        shamir.reconstruct(pairs[:4] + [(5, other)], 3)
    with pytest.raises(shamir.ShamirError, match="holder 0"):
        shamir.split(b"k" * 32, 2, [0, 1])
    with pytest.raises(shamir.ShamirError, match="expected 33 bytes"):
        shamir.reconstruct([(1, b"short"), (2, shares[2])], 2)
    with pytest.raises(shamir.ShamirError, match="threshold 6"):
        shamir.split(b"k" * 32, 6, [1, 2, 3, 4, 5])


# ---------------------------------------------------------------- keys, AEAD, PRG


def test_key_agreement_is_symmetric_and_labelled():
    a, b = crypto.KeyPair.generate(entropy(4)), crypto.KeyPair.generate(entropy(5))
    assert a.agree(b.public, "pairwise-mask", 7, 1, 2) == b.agree(a.public, "pairwise-mask", 7, 2, 1)
    labels = {
        a.agree(b.public, "pairwise-mask", 7, 1, 2),
        a.agree(b.public, "share-encryption", 7, 1, 2),
        a.agree(b.public, "pairwise-mask", 8, 1, 2),
        a.agree(b.public, "pairwise-mask", 7, 1, 3),
    }
    assert len(labels) == 4  # purpose, round and pair each change the key
    with pytest.raises(SecAggError, match="key agreement"):
        a.agree(bytes(32), "pairwise-mask", 7, 1, 2)  # a low-order point


def test_share_encryption_binds_round_sender_and_receiver():
    key = bytes(range(32))
    ciphertext = crypto.encrypt(key, b"two shares", 7, 1, 2, entropy(6))
    assert crypto.decrypt(key, ciphertext, 7, 1, 2) == b"two shares"
    for round_id, sender, receiver in ((8, 1, 2), (7, 2, 1), (7, 1, 3)):
        with pytest.raises(crypto.DecryptionError, match="failed authentication"):
            crypto.decrypt(key, ciphertext, round_id, sender, receiver)
    tampered = bytearray(ciphertext)
    tampered[20] ^= 1
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(key, bytes(tampered), 7, 1, 2)


def test_prg_is_aes_ctr_from_counter_zero():
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    seed = bytes(range(32))
    stream = crypto.prg(seed, 1000)
    assert stream.dtype == np.uint32 and stream.size == 1000
    assert np.array_equal(crypto.prg(seed, 10), stream[:10])  # a prefix: lengths agree on shared entries
    first_block = Cipher(algorithms.AES(seed), modes.ECB()).encryptor().update(bytes(16))  # E_k(counter 0)
    assert stream[:4].tobytes() == first_block
    assert not np.array_equal(crypto.prg(bytes(32), 1000), stream)


def test_prg_into_adds_and_subtracts_the_prg_with_its_reused_buffers():
    rng = np.random.default_rng(1)
    for length in (1000, 1000, 7, 4099, 0):  # a new length replaces this thread's buffers
        start = rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32)
        for seed, sign in ((bytes(range(32)), +1), (bytes(32), -1)):
            out = start.copy()
            crypto.prg_into(out, seed, sign)
            mask = crypto.prg(seed, length)
            assert np.array_equal(out, start + mask if sign > 0 else start - mask)
    with pytest.raises(SecAggError, match="32 bytes"):
        crypto.prg_into(np.zeros(4, np.uint32), bytes(31), +1)


# ---------------------------------------------------------------- neighbour graph


def test_harary_graph_is_k_regular_symmetric_and_seeded():
    g = graph.neighbours(50, 10, 3, b"s" * 32)
    assert all(len(v) == 10 and i not in v for i, v in g.items())
    assert all(i in g[j] for i, v in g.items() for j in v)
    assert g == graph.neighbours(50, 10, 3, b"s" * 32)
    assert g != graph.neighbours(50, 10, 3, b"t" * 32) and g != graph.neighbours(50, 10, 4, b"s" * 32)
    assert graph.neighbours(5, 4, 0, b"s" * 32)[3] == (1, 2, 4, 5)
    with pytest.raises(ValueError, match="even"):
        graph.neighbours(50, 9, 3, b"s" * 32)


def test_default_degree_and_threshold():
    table = {n: SecAggConfig.create(0, n, 10) for n in (5, 20, 60, 100, 1000)}
    assert {n: (c.neighbours, c.threshold) for n, c in table.items()} == {
        5: (4, 3),
        20: (14, 8),
        60: (42, 22),
        100: (68, 35),
        1000: (236, 119),
    }
    for n, c in table.items():
        assert c.threshold > c.neighbours / 2 and c.dropout_failure <= 1e-6
        if n <= 100:  # small cohorts: any floor(n/3) dropouts leave every device t live neighbours
            assert c.neighbours - c.threshold >= c.max_dropouts
    with pytest.raises(SecAggError, match="cohort_size"):
        SecAggConfig.create(0, 3, 10)


def test_dropout_failure_bound_holds_against_simulation():
    n, k, dropouts = 120, 20, 40  # a deliberately thin graph, so failures happen
    t = graph.threshold_for(k)
    bound = graph.dropout_failure_bound(n, k, t, dropouts)
    g = graph.neighbours(n, k, 0, b"g" * 32)
    rng = np.random.default_rng(0)
    trials, failures = 2000, 0
    for _ in range(trials):
        dropped = set(rng.choice(np.arange(1, n + 1), dropouts, replace=False).tolist())
        failures += any(sum(j not in dropped for j in g[i]) < t for i in g)
    assert 0.05 < failures / trials <= bound  # the union bound is an upper bound, and not a vacuous one here


def test_components_find_a_split_ring():
    g = graph.neighbours(12, 2, 0, b"c" * 32)
    ring = graph.ring_order(12, 0, b"c" * 32)
    alive = set(ring) - {ring[0], ring[6]}
    parts = graph.components(alive, g)
    assert sorted(len(p) for p in parts) == [5, 5]
    assert len(graph.components(set(ring) - {ring[0]}, g)) == 1


# ---------------------------------------------------------------- Skellam noise


def test_skellam_shares_sum_to_the_central_variance():
    rng = np.random.default_rng(0)
    mu, m = 400.0, 20
    one = noise.sample_skellam(rng, mu, 200_000)
    assert one.dtype == np.int64 and abs(one.mean()) < 0.2 and abs(one.var() / mu - 1) < 0.02
    total = sum(noise.sample_skellam(rng, mu / m, 100_000) for _ in range(m))
    assert abs(total.var() / mu - 1) < 0.03
    # the Chernoff tail bound holds (and is not absurdly loose)
    for t in (40, 60, 80):
        empirical = np.mean(np.abs(one) >= t)
        assert empirical <= noise.skellam_tail(mu, t) < 50 * max(empirical, 1e-6)


def test_equivalent_noise_multiplier_dominates_the_skellam_rdp_bound():
    cfg = SecAggConfig.create(0, 100, 61706, clip_norm=1.0, noise_multiplier=1.0, max_weight=1)
    l1, l2 = cfg.sensitivities
    mu = cfg.central_variance
    z = cfg.equivalent_noise_multiplier()
    assert 0.99 < z <= 1.0
    for alpha in range(2, 257):
        skellam = alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
        assert alpha / (2 * z**2) >= skellam * (1 - 1e-12)
    # the central std on the de-quantized sum is z * C when exactly min_survivors remain
    assert cfg.central_noise_std(cfg.min_survivors) == pytest.approx(1.0 + math.sqrt(61706) / cfg.quantizer.scale)
    # with little variance the discretization surcharge shows: far below the Gaussian's sqrt(mu) / Delta2 = 2
    assert noise.equivalent_noise_multiplier(4.0, 10.0, 1.0) < 0.5 * 2.0


# ---------------------------------------------------------------- the config on the wire


def test_config_round_trips_through_json_and_refuses_bad_fields():
    cfg = SecAggConfig.create(9, 20, 61706, clip_norm=0.5, noise_multiplier=0.8, max_weight=1)
    assert SecAggConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = {
        "threshold": (7, "strict majority"),
        "graph_seed": ("zz", "64 hex"),
        "neighbours": (13, "even"),
        "clip_norm": ("big", "clip_norm"),
        "rounding": ("up", "rounding"),
    }
    for name, (value, message) in bad.items():
        with pytest.raises(SecAggError, match=message):
            SecAggConfig.from_dict({**cfg.to_dict(), name: value})
    with pytest.raises(SecAggError, match="missing vector_length"):
        SecAggConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "vector_length"})
    with pytest.raises(SecAggError, match="max_weight 1"):
        SecAggConfig.create(0, 20, 10, clip_norm=1.0, noise_multiplier=1.0)

"""The int4 update encoding: stochastic 4-bit levels, packed two per byte, dense and sparse."""

from __future__ import annotations

import numpy as np
import pytest

from engine.serialize.container import dumps, loads
from protocol.deltas import pack_int4, quantize_int4, unpack_int4
from protocol.update import UpdateError, decode_update, encode_update

SHAPES = {"w": (5, 7), "b": (3,)}  # odd element counts: a padding nibble each


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def encode(d, **kw) -> bytes:
    return encode_update(d, sample_count=4, round_id=1, base_version=0, encoding="int4", **kw)


def test_pack_and_unpack_are_inverse():
    q = np.array([-7, 7, 0, 3, -1], np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == 3
    np.testing.assert_array_equal(unpack_int4(packed, 5), q)


def test_quantization_is_within_one_step_and_unbiased():
    x = np.random.default_rng(1).normal(size=200).astype(np.float32)
    rng = np.random.default_rng(2)
    draws = []
    for _ in range(400):
        q, scale = quantize_int4(x, rng)
        assert q.min() >= -7 and q.max() <= 7
        assert np.all(np.abs(q * scale - x) < scale + 1e-6)
        draws.append(q * scale)
    assert np.abs(np.mean(draws, axis=0) - x).max() < 0.1 * scale  # the average converges to x


def test_dense_int4_round_trip_and_size():
    d = delta()
    data = encode(d, rng=np.random.default_rng(0))
    update = decode_update(data, expected=SHAPES)
    assert update.encoding == "int4"
    for name, value in d.items():
        scale = np.abs(value).max() / 7
        assert update.delta[name].shape == value.shape
        assert np.abs(update.delta[name] - value).max() < scale + 1e-6
    stored = loads(data, kind="update").tensors
    assert stored["w"].dtype == np.uint8 and stored["w"].shape == (18,)
    float32 = encode_update(d, sample_count=4, round_id=1, base_version=0)
    assert len(data) < len(float32)


def test_seeded_rng_makes_encoding_repeatable():
    d = delta()
    assert encode(d, rng=np.random.default_rng(5)) == encode(d, rng=np.random.default_rng(5))


def test_sparse_int4_round_trip():
    d = delta(3)
    update = decode_update(encode(d, topk_fraction=0.3, rng=np.random.default_rng(0)), expected=SHAPES)
    assert update.sparse
    for name, value in d.items():
        kept = update.delta[name] != 0
        assert 0 < kept.sum() <= np.ceil(0.3 * value.size)
        assert np.abs(update.delta[name][kept] - value[kept]).max() <= np.abs(value).max() / 7 + 1e-6


def rewritten(data: bytes, change) -> bytes:
    c = loads(data, kind="update")
    tensors, meta = dict(c.tensors), dict(c.metadata)
    change(tensors, meta)
    return dumps(tensors, meta, kind="update")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, m: t.update(w=np.zeros(18, np.uint8)), "outside -7..7"),  # nibble 0 = level -8, never written
        (lambda t, m: t.update(w=np.full(17, 0x88, np.uint8)), "packed int4"),
        (lambda t, m: t.update(w=np.full(18, 8, np.int8)), "needs uint8"),
        (lambda t, m: m["tensors"]["w"].update(scale=-1.0), "scale"),
        (lambda t, m: m["tensors"]["w"].update(scale="0.1"), "scale"),
    ],
)
def test_hostile_int4_updates_are_refused_by_name(change, message):
    data = rewritten(encode(delta(), rng=np.random.default_rng(0)), change)
    with pytest.raises(UpdateError, match=message) as info:
        decode_update(data, expected=SHAPES)
    assert "'w'" in str(info.value)


def test_sparse_int4_with_too_few_packed_values_is_refused():
    def drop(t, m):
        t["w/values"] = t["w/values"][:-1]

    data = rewritten(encode(delta(), topk_fraction=0.5, rng=np.random.default_rng(0)), drop)
    with pytest.raises(UpdateError, match="stored values"):
        decode_update(data, expected=SHAPES)

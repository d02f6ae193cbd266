"""The int4-bitmap update encoding: top-k positions as one bit per entry, int4 values."""

from __future__ import annotations

import numpy as np
import pytest

from engine.serialize.container import dumps, loads
from protocol.deltas import pack_mask, topk_count, topk_indices, unpack_mask
from protocol.update import UpdateError, decode_update, encode_update

SHAPES = {"w": (7, 9), "b": (5,)}  # 63 and 5 entries: the last mask byte is partly padding


def delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def encode(d, encoding="int4-bitmap", topk_fraction=0.5, seed=0) -> bytes:
    return encode_update(
        d, sample_count=4, round_id=1, base_version=0, encoding=encoding, topk_fraction=topk_fraction,
        rng=np.random.default_rng(seed),
    )  # fmt: skip


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 1000])
def test_mask_round_trip_is_exact(size):
    rng = np.random.default_rng(size)
    for keep in {0, size // 3, size}:
        indices = np.sort(rng.choice(size, keep, replace=False))
        mask = pack_mask(indices, size)
        assert mask.dtype == np.uint8 and mask.shape == ((size + 7) // 8,)
        np.testing.assert_array_equal(unpack_mask(mask, size), indices)


def test_mask_bit_order_is_least_significant_first():
    np.testing.assert_array_equal(pack_mask(np.array([0, 3, 9]), 10), np.array([0b1001, 0b10], np.uint8))


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.array([0, 0b100], np.uint8), "past the tensor"),  # bit 10 of a 10-entry tensor
        (np.array([0], np.uint8), "must be 2 uint8 bytes"),
        (np.array([0, 0, 0], np.uint8), "must be 2 uint8 bytes"),
        (np.array([0, 0], np.int8), "must be 2 uint8 bytes"),
    ],
)
def test_malformed_masks_are_refused(mask, message):
    with pytest.raises(ValueError, match=message):
        unpack_mask(mask, 10)


def test_sparse_round_trip_keeps_exactly_the_top_k_positions():
    d = delta(1)
    data = encode(d)
    update = decode_update(data, expected=SHAPES)
    assert update.encoding == "int4-bitmap" and update.sparse
    stored = loads(data, kind="update").tensors
    assert "w/indices" not in stored and stored["w/mask"].shape == (8,)
    for name, value in d.items():
        flat = value.reshape(-1)
        kept = topk_indices(flat, topk_count(flat.size, 0.5))
        # stochastic int4 may round a small kept value to 0: its position is still sent, only its value is 0
        sent = np.flatnonzero(update.delta[name].reshape(-1))
        assert set(sent) <= set(kept)
        scale = np.abs(flat[kept]).max() / 7
        assert np.abs(update.delta[name].reshape(-1)[kept] - flat[kept]).max() < scale + 1e-6
        outside = np.setdiff1d(np.arange(flat.size), kept)
        assert not update.delta[name].reshape(-1)[outside].any()


def test_kept_values_are_unbiased():
    d = delta(2)
    flat = d["w"].reshape(-1)
    kept = topk_indices(flat, topk_count(flat.size, 0.5))
    target = np.zeros_like(flat)
    target[kept] = flat[kept]
    mean = np.mean([decode_update(encode(d, seed=s)).delta["w"].reshape(-1) for s in range(300)], axis=0)
    scale = np.abs(flat[kept]).max() / 7
    assert np.abs(mean - target).max() < 0.15 * scale  # per-draw error up to one scale; 300 draws average it out


def test_bitmap_is_smaller_than_int32_indices_when_keeping_half():
    big = {"w": np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)}
    bitmap = encode(big)
    indices = encode(big, encoding="int4")
    dense_float32 = encode(big, encoding="float32", topk_fraction=None)
    assert len(bitmap) < len(indices) and len(bitmap) < len(dense_float32) / 8


def test_very_sparse_tensors_fall_back_to_int32_indices():
    big = {"w": np.random.default_rng(4).normal(size=1000).astype(np.float32)}
    data = encode(big, topk_fraction=0.01)  # 10 entries: 40 bytes of indices, 125 of bitmap
    stored = loads(data, kind="update").tensors
    assert stored["w/indices"].dtype == np.int32 and "w/mask" not in stored
    assert np.count_nonzero(decode_update(data).delta["w"]) <= 10


def test_without_top_k_it_is_dense_int4():
    data = encode(delta(), topk_fraction=None)
    update = decode_update(data, expected=SHAPES)
    assert update.encoding == "int4-bitmap" and not update.sparse
    assert loads(data, kind="update").tensors["w"].shape == (32,)  # 63 nibbles, packed


def rewritten(data: bytes, change) -> bytes:
    c = loads(data, kind="update")
    tensors, meta = dict(c.tensors), dict(c.metadata)
    change(tensors, meta)
    return dumps(tensors, meta, kind="update")


def set_padding_bit(t, m):
    t["w/mask"] = t["w/mask"].copy()
    t["w/mask"][-1] |= 0x80  # bit 63 of a 63-entry tensor


def one_more_position(t, m):
    mask = t["w/mask"].copy()
    free = np.setdiff1d(np.arange(63), unpack_mask(mask, 63))[0]
    mask[free // 8] |= 1 << (free % 8)
    t["w/mask"] = mask


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (set_padding_bit, "past the tensor"),
        (lambda t, m: t.update({"w/mask": t["w/mask"][:-1]}), "must be 8 uint8 bytes"),
        (lambda t, m: t.update({"w/mask": t["w/mask"].astype(np.int8)}), "must be 8 uint8 bytes"),
        (lambda t, m: t.update({"w/mask": t["w/mask"].reshape(2, 4)}), "must be 1-D"),
        (lambda t, m: t.pop("w/mask"), "'w/mask' is missing"),
        (one_more_position, "stored values"),  # positions and values disagree in count
        (lambda t, m: t.update({"w/values": t["w/values"][:-1]}), "stored values"),
        (lambda t, m: m.update(encoding="int4"), "bitmap positions need a bitmap update encoding"),
        (lambda t, m: t.update({"w/indices": np.arange(3, dtype=np.int32)}), "not described"),
    ],
)
def test_hostile_bitmap_updates_are_refused_by_name(change, message):
    data = rewritten(encode(delta()), change)
    with pytest.raises(UpdateError, match=message) as info:
        decode_update(data, expected=SHAPES)
    assert "'w" in str(info.value)


def test_unknown_encodings_are_refused_at_both_ends():
    with pytest.raises(UpdateError, match="not one of"):
        encode(delta(), encoding="int3-bitmap")
    data = rewritten(encode(delta()), lambda t, m: m.update(encoding="int2-bitmap"))
    with pytest.raises(UpdateError, match="encoding 'int2-bitmap' is not one of"):
        decode_update(data)

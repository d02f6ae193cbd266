"""The update wire format: round trips, the int8 error bound, and hostile bodies."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from engine.serialize.container import ContainerError, dumps, loads
from protocol.update import UpdateError, decode_update, encode_update

SHAPES = {"conv1.weight": (6, 1, 5, 5), "conv1.bias": (6,), "fc.weight": (10, 84), "fc.bias": (10,)}


def make_delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in SHAPES.items()}


def encode(delta=None, **kw) -> bytes:
    args = {"sample_count": 120, "round_id": 3, "base_version": 2, "metrics": {"loss": 0.5}}
    args.update(kw)
    return encode_update(make_delta() if delta is None else delta, **args)


def rebuild(data: bytes, edit) -> bytes:
    """Re-pack a valid update after `edit(metadata, tensors)` changed it (a well-formed but lying body)."""
    c = loads(data)
    edit(c.metadata, c.tensors)
    return dumps(c.tensors, c.metadata, kind=c.kind)


@pytest.mark.parametrize("encoding,tol", [("float32", 0.0), ("float16", 1e-3)])
def test_dense_round_trip(encoding, tol):
    delta = make_delta()
    update = decode_update(encode(delta, encoding=encoding), expected=SHAPES)
    assert (update.sample_count, update.round_id, update.base_version) == (120, 3, 2)
    assert update.metrics == {"loss": 0.5} and update.encoding == encoding and not update.sparse
    for name in SHAPES:
        assert update.delta[name].dtype == np.float32 and update.delta[name].shape == SHAPES[name]
        np.testing.assert_allclose(update.delta[name], delta[name], rtol=0, atol=tol)


def test_int8_error_within_half_scale():
    delta = make_delta(1)
    data = encode(delta, encoding="int8")
    scales = {n: s["scale"] for n, s in loads(data).metadata["tensors"].items()}
    update = decode_update(data, expected=SHAPES)
    for name in SHAPES:
        assert scales[name] == pytest.approx(np.abs(delta[name]).max() / 127, rel=1e-6)
        error = np.abs(update.delta[name] - delta[name])
        assert error.max() <= scales[name] / 2 * (1 + 1e-5)
        assert error.max() > 0  # it really was quantized
    big = {"w": np.random.default_rng(0).normal(size=(200, 300)).astype(np.float32)}
    assert len(encode(big, encoding="int8")) < 0.27 * len(encode(big))  # ~4x smaller than float32


def test_int8_all_zero_tensor():
    delta = {"w": np.zeros((3, 3), np.float32)}
    update = decode_update(encode(delta, encoding="int8"))
    np.testing.assert_array_equal(update.delta["w"], 0)


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_sparse_round_trip_keeps_largest(encoding):
    delta = make_delta(2)
    update = decode_update(encode(delta, encoding=encoding, topk_fraction=0.1), expected=SHAPES)
    assert update.sparse and update.encoding == encoding
    for name, value in delta.items():
        got = update.delta[name]
        k = max(1, int(np.ceil(0.1 * value.size)))
        kept = np.flatnonzero(got)
        assert len(kept) <= k
        threshold = np.sort(np.abs(value).ravel())[-k]
        assert np.all(np.abs(value.ravel()[kept]) >= threshold - 1e-7)
        tol = {"float32": 0, "float16": 1e-3, "int8": np.abs(value).max() / 254 * 1.001}[encoding]
        np.testing.assert_allclose(got.ravel()[kept], value.ravel()[kept], atol=tol, rtol=0)


def test_sparse_is_smaller():
    big = {"w": np.random.default_rng(0).normal(size=(200, 300)).astype(np.float32)}
    dense, sparse = encode(big), encode(big, encoding="int8", topk_fraction=0.05)
    assert len(sparse) < 0.1 * len(dense)  # 5% of entries, 5 bytes each instead of 4


def test_encoder_refuses_bad_input():
    with pytest.raises(UpdateError, match="NaN"):
        encode({"w": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(UpdateError, match="sample_count"):
        encode(sample_count=0)
    with pytest.raises(UpdateError, match="encoding"):
        encode(encoding="bfloat16")
    with pytest.raises(UpdateError, match="float16 range"):
        encode({"w": np.array([1e6], np.float32)}, encoding="float16")
    with pytest.raises(UpdateError, match="metric 'loss'"):
        encode(metrics={"loss": float("inf")})


def _set_meta(key, value):
    return lambda meta, tensors: meta.__setitem__(key, value)


HOSTILE = [
    ("wrong format", _set_meta("format", "other"), "format"),
    ("sample_count zero", _set_meta("sample_count", 0), "sample_count"),
    ("sample_count float", _set_meta("sample_count", 1.5), "sample_count"),
    ("sample_count bool", _set_meta("sample_count", True), "sample_count"),
    ("round_id string", _set_meta("round_id", "3"), "round_id"),
    ("bad encoding", _set_meta("encoding", "zip"), "encoding"),
    ("metric not a number", _set_meta("metrics", {"loss": "x"}), "metric 'loss'"),
    ("missing tensor data", lambda m, t: t.pop("fc.bias"), "fc.bias"),
    ("undescribed tensor", lambda m, t: t.__setitem__("secret", np.zeros(3, np.float32)), "secret"),
    ("shape lie", lambda m, t: m["tensors"]["fc.bias"].__setitem__("shape", [11]), "fc.bias"),
    ("dtype lie", lambda m, t: t.__setitem__("fc.bias", np.zeros(10, np.float16)), "fc.bias"),
    ("NaN value", lambda m, t: t["fc.bias"].__setitem__(0, np.nan), "NaN"),
    ("Inf value", lambda m, t: t["conv1.bias"].__setitem__(0, np.inf), "conv1.bias"),
    ("huge declared shape", lambda m, t: m["tensors"]["fc.bias"].__setitem__("shape", [10**9, 10**6]), "limit"),
]


@pytest.mark.parametrize("label,edit,needle", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_dense_bodies(label, edit, needle):
    with pytest.raises(UpdateError, match=needle):
        decode_update(rebuild(encode(), edit))


SPARSE_HOSTILE = [
    ("index out of range", lambda m, t: t["fc.weight/indices"].__setitem__(0, 840), "out of range"),
    ("negative index", lambda m, t: t["fc.weight/indices"].__setitem__(0, -1), "out of range"),
    ("duplicate index", lambda m, t: t["fc.weight/indices"].__setitem__(1, t["fc.weight/indices"][0]), "duplicate"),
    (
        "indices wrong dtype",
        lambda m, t: t.__setitem__("fc.weight/indices", t["fc.weight/indices"].astype(np.int64)),
        "int32",
    ),
    ("values missing", lambda m, t: t.pop("fc.weight/values"), "fc.weight/values"),
    ("length mismatch", lambda m, t: t.__setitem__("fc.weight/values", t["fc.weight/values"][:-1]), "indices but"),
    ("bad scale", lambda m, t: m["tensors"]["fc.weight"].__setitem__("scale", -1.0), "scale"),
    ("NaN scale", lambda m, t: m["tensors"]["fc.weight"].__setitem__("scale", "nan"), "scale"),
    ("huge sparse shape", lambda m, t: m["tensors"]["fc.weight"].__setitem__("shape", [2**31, 2**31]), "limit"),
]


@pytest.mark.parametrize("label,edit,needle", SPARSE_HOSTILE, ids=[h[0] for h in SPARSE_HOSTILE])
def test_hostile_sparse_bodies(label, edit, needle):
    data = encode(encoding="int8", topk_fraction=0.1)
    with pytest.raises(UpdateError, match=needle):
        decode_update(rebuild(data, edit))


def test_expected_names_and_shapes():
    data = encode()
    wrong_names = dict(SHAPES)
    wrong_names.pop("fc.bias")
    wrong_names["head.bias"] = (10,)
    with pytest.raises(UpdateError, match=r"missing \['head.bias'\], unknown \['fc.bias'\]"):
        decode_update(data, expected=wrong_names)
    with pytest.raises(UpdateError, match="fc.weight.*does not match"):
        decode_update(data, expected={**SHAPES, "fc.weight": (84, 10)})


def test_truncated_and_wrong_kind_and_garbage():
    data = encode()
    for cut in (0, 10, 40, len(data) // 2, len(data) - 1):
        with pytest.raises(ContainerError):
            decode_update(data[:cut])
    with pytest.raises(ContainerError, match="expected a 'update' container"):
        decode_update(dumps({"w": np.zeros(2, np.float32)}, {"format": "pocketfed-model"}, kind="model"))
    with pytest.raises(ContainerError, match="magic"):
        decode_update(b"GET / HTTP/1.1\r\n" * 4)
    # A header that declares a giant tensor but carries no bytes is refused before allocation.
    empty_sha = hashlib.sha256(b"").hexdigest()
    header = json.dumps(
        {
            "kind": "update",
            "metadata": {},
            "payload_sha256": empty_sha,
            "tensors": [{"name": "w", "dtype": "float32", "shape": [2**40], "offset": 0, "nbytes": 4 * 2**40}],
        }
    ).encode()
    with pytest.raises(ContainerError, match="past the payload"):
        decode_update(b"PFTENSOR" + struct.pack("<IQ", 1, len(header)) + header)
    assert issubclass(UpdateError, ContainerError)

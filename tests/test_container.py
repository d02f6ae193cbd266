"""The tensor container every model, update and checkpoint travels in: round trip and refusals."""

import hashlib
import json
import struct

import numpy as np
import pytest

from engine.serialize.container import MAGIC, ContainerError, dumps, load, loads, save, write_atomic


def _forge(header: dict | bytes, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<8sIQ", MAGIC, 1, len(raw)) + raw + payload


def _header(tensors, payload=b"", **extra):
    return {
        "kind": "tensors",
        "metadata": {},
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "tensors": tensors,
        **extra,
    }


def test_round_trip_keeps_names_dtypes_shapes_values_and_metadata():
    tensors = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "i": np.array([1, -2], np.int64),
        "h": np.ones((2, 2), np.float16),
        "q": np.array([-127, 5], np.int8),
        "s": np.float32(3.5),
    }
    back = loads(dumps(tensors, {"round": 3, "note": "x"}, kind="update"), kind="update")
    assert back.kind == "update" and back.metadata == {"round": 3, "note": "x"}
    for name, value in tensors.items():
        assert back.tensors[name].dtype == np.asarray(value).dtype
        np.testing.assert_array_equal(back.tensors[name], value)
    back.tensors["w"][0, 0] = 99  # arrays are writable copies, not views of the input bytes


@pytest.mark.parametrize(
    "mangle,message",
    [
        (lambda b: b"NOTPOCKT" + b[8:], "wrong magic"),
        (lambda b: b[:10], "too short"),
        (lambda b: b[:-3], "checksum"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
        (lambda b: b[:8] + struct.pack("<I", 7) + b[12:], "version 7"),
        (lambda b: b[:12] + struct.pack("<Q", 1 << 40) + b[20:], "header length"),
    ],
)
def test_damaged_bytes_are_refused_with_the_reason(mangle, message):
    good = dumps({"w": np.ones((4, 4), np.float32)}, {})
    with pytest.raises(ContainerError, match=message):
        loads(mangle(good))


def test_wrong_kind_is_refused():
    with pytest.raises(ContainerError, match="expected a 'model' container, got 'update'"):
        loads(dumps({}, {}, kind="update"), kind="model")


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"name": "w", "dtype": "float32", "shape": [1 << 30, 1 << 30], "offset": 0, "nbytes": 16}, "needs"),
        ({"name": "w", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}, "past the payload"),
        ({"name": "w", "dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}, "not allowed"),
        ({"name": "w", "dtype": "float32", "shape": [-1], "offset": 0, "nbytes": 4}, "shape"),
        ({"name": "w", "dtype": "float32", "shape": [1] * 9, "offset": 0, "nbytes": 4}, "shape"),
        ({"name": "", "dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}, "no name"),
        ({"name": "w", "dtype": "float32", "shape": [1], "offset": -4, "nbytes": 4}, "non-negative"),
    ],
)
def test_hostile_headers_are_refused_before_allocating(entry, message):
    with pytest.raises(ContainerError, match=message):
        loads(_forge(_header([entry])))


def test_duplicate_names_and_non_json_headers_are_refused():
    payload = np.zeros(1, np.float32).tobytes()
    entry = {"name": "w", "dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}
    with pytest.raises(ContainerError, match="twice"):
        loads(_forge(_header([entry, entry], payload), payload))
    with pytest.raises(ContainerError, match="not valid JSON"):
        loads(_forge(b"\xff\xfe not json"))
    with pytest.raises(ContainerError, match="not valid JSON"):
        loads(_forge(b'{"kind": ' + b"9" * 5000 + b"}"))  # Python refuses huge integer literals
    with pytest.raises(ContainerError, match="not valid JSON"):
        loads(_forge(b"[" * 100_000 + b"]" * 100_000))


def test_save_is_atomic_and_load_reads_it_back(tmp_path, monkeypatch):
    path = tmp_path / "m.pft"
    save(path, {"w": np.ones(3, np.float32)}, {"v": 1})
    assert load(path).metadata == {"v": 1}

    class Boom(Exception):
        pass

    def failing_fsync(fd):
        raise Boom

    monkeypatch.setattr("os.fsync", failing_fsync)
    with pytest.raises(Boom):
        write_atomic(path, b"half")
    monkeypatch.undo()
    assert load(path).metadata == {"v": 1}  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.pft"]  # no temporary file left behind

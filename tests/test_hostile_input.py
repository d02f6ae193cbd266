"""Targeted hostile input against a real server on loopback: broken and lying update bodies, header
floods, borrowed tokens, replays and admin calls without the admin token. Each must be refused
with a 4xx naming the problem, and leave the database exactly as it was."""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import struct
import time

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import FakeClock, ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import MAGIC, dumps
from protocol.update import encode_update

KEY, ADMIN = "k", "admin"
SHAPES = {"w": (16, 8), "b": (8,)}


@pytest.fixture
def env(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=0, shapes=SHAPES))
    settings = Settings(
        db=str(tmp_path / "c.db"),
        model=str(model),
        enrollment_key=KEY,
        admin_token=ADMIN,
        goal=2,
        min_devices=1,
        over_select=1.0,
        deadline=1000,
        max_body_bytes=200_000,
    )
    app = create_app(settings, clock=FakeClock())
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        a, b, c = (TestDevice(client, KEY, name) for name in "abc")
        yield client, server, tmp_path / "c.db", (a, b, c)


def snapshot(db_path) -> dict:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return {
            t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
            for t in ("devices", "model_versions", "rounds", "assignments", "updates", "server_state")
        }
    finally:
        conn.close()


def good_update(**overrides):
    options = {"sample_count": 10, "round_id": 1, "base_version": 0, **overrides}
    return encode_update(random_delta(SHAPES, 1), **options)


def raw_container(header: object, payload: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<8sIQ", MAGIC, 1, len(text)) + text + payload


def update_meta(**tensors):
    return {
        "format": "pocketfed-update",
        "format_version": 1,
        "encoding": "float32",
        "sparse": False,
        "sample_count": 10,
        "round_id": 1,
        "base_version": 0,
        "metrics": {},
        "tensors": tensors,
    }


GOOD = good_update()
HOSTILE_BODIES = {
    "random bytes": bytes(range(256)) * 10,
    "truncated in the prefix": GOOD[:10],
    "truncated in the header": GOOD[:60],
    "truncated in the payload": GOOD[:-100],
    "one flipped payload byte": GOOD[:-1] + bytes([GOOD[-1] ^ 1]),
    "a model instead of an update": stand_in_model_bytes(shapes=SHAPES),
    "unknown encoding": dumps(
        {"w": np.zeros((16, 8), np.float32), "b": np.zeros(8, np.float32)},
        update_meta(w={"shape": [16, 8], "encoding": "bfloat7"}, b={"shape": [8], "encoding": "float32"}),
        kind="update",
    ),
    "float64 values": dumps(
        {"w": np.zeros((16, 8)), "b": np.zeros(8)},
        update_meta(w={"shape": [16, 8], "encoding": "float32"}, b={"shape": [8], "encoding": "float32"}),
        kind="update",
    ),
    "int8 without a scale": dumps(
        {"w": np.zeros((16, 8), np.int8), "b": np.zeros(8, np.int8)},
        {
            **update_meta(w={"shape": [16, 8], "encoding": "int8"}, b={"shape": [8], "encoding": "int8"}),
            "encoding": "int8",
        },
        kind="update",
    ),
    "wrong shape": encode_update(
        {"w": np.zeros((8, 16), np.float32), "b": np.zeros(8, np.float32)}, sample_count=1, round_id=1, base_version=0
    ),
    "missing tensor": encode_update({"w": np.zeros((16, 8), np.float32)}, sample_count=1, round_id=1, base_version=0),
    "huge declared shape in metadata": dumps(
        {"w": np.zeros((16, 8), np.float32), "b": np.zeros(8, np.float32)},
        update_meta(w={"shape": [2**31, 2**31], "encoding": "float32"}, b={"shape": [8], "encoding": "float32"}),
        kind="update",
    ),
    "huge declared shape in the header": raw_container(
        {
            "kind": "update",
            "metadata": update_meta(),
            "payload_sha256": "0" * 64,
            "tensors": [{"name": "w", "dtype": "float32", "shape": [2**40, 2**40], "offset": 0, "nbytes": 2**82 * 4}],
        }
    ),
    "header length larger than the body": struct.pack("<8sIQ", MAGIC, 1, 2**62) + b"{}",
    "deeply nested header": raw_container(b"[" * 100_000 + b"]" * 100_000),
    "integer with 5000 digits": raw_container(b'{"tensors": [], "kind": "update", "x": ' + b"9" * 5000 + b"}"),
    "NaN in the delta": dumps(
        {"w": np.full((16, 8), np.nan, np.float32), "b": np.zeros(8, np.float32)},
        update_meta(w={"shape": [16, 8], "encoding": "float32"}, b={"shape": [8], "encoding": "float32"}),
        kind="update",
    ),
    "zero samples": dumps(
        {"w": np.zeros((16, 8), np.float32), "b": np.zeros(8, np.float32)},
        {
            **update_meta(w={"shape": [16, 8], "encoding": "float32"}, b={"shape": [8], "encoding": "float32"}),
            "sample_count": 0,
        },
        kind="update",
    ),
    "wrong round inside": good_update(round_id=7),
    "empty": b"",
}


def test_hostile_update_bodies_are_refused_and_change_nothing(env):
    client, _, db, (a, _, _) = env
    a.task()
    before = snapshot(db)
    for name, body in HOSTILE_BODIES.items():  # one server for all: each refusal must leave no trace
        answer = a.upload(1, body, key=f"hostile-{name}")
        assert answer.status_code in (400, 413, 422), (name, answer.status_code, answer.text)
        assert answer.json()["detail"], name
        assert snapshot(db) == before, name
    assert a.upload(1, GOOD, key="then-good").status_code == 202  # the device can still contribute


def test_oversized_bodies_are_refused_before_reading(env):
    client, server, db, (a, _, _) = env
    a.task()
    before = snapshot(db)
    big = a.upload(1, b"\0" * 300_000)
    assert big.status_code == 413 and "limit" in big.json()["detail"]
    token = a.headers["Authorization"].encode()
    lying = raw_request(
        server,
        b"POST /v1/rounds/1/updates HTTP/1.1\r\n"
        + CLOSE
        + b"Authorization: "
        + token
        + b"\r\nIdempotency-Key: lie\r\nContent-Length: 99999999999\r\n\r\n"
        + b"x" * 10,
    )
    assert lying.split(b" ")[1] == b"413", lying[:200]
    assert snapshot(db) == before


CLOSE = b"Host: x\r\nConnection: close\r\n"  # the server answers, then closes: no keep-alive wait


def raw_request(server, request: bytes) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def test_header_floods(env):
    client, server, db, (a, _, _) = env
    before = snapshot(db)
    token = a.headers["Authorization"].encode()
    many = b"".join(b"X-Flood-%d: %d\r\n" % (i, i) for i in range(5000))  # ~80 KB of headers
    answer = raw_request(
        server,
        b"POST /v1/checkin HTTP/1.1\r\n"
        + CLOSE
        + b"Authorization: "
        + token
        + b"\r\n"
        + many
        + b"Content-Length: 2\r\n\r\n{}",
    )
    assert answer == b"" or answer.split(b" ")[1].startswith(b"4"), answer[:100]
    huge = raw_request(server, b"GET /healthz HTTP/1.1\r\n" + CLOSE + b"X-Huge: " + b"a" * 1_000_000 + b"\r\n\r\n")
    assert huge == b"" or huge.split(b" ")[1].startswith(b"4"), huge[:100]
    # a flood of tokens: many Authorization headers must not authenticate as anyone in particular
    flood = {f"X-Pad-{i}": "p" * 50 for i in range(100)}
    assert client.post("/v1/checkin", json={}, headers=flood).status_code == 401
    assert snapshot(db) == before
    assert client.get("/healthz").json()["status"] == "ok"  # still serving


def test_one_devices_token_cannot_act_for_another(env):
    client, _, db, (a, b, c) = env
    a.task()
    b.task()  # goal 2, over_select 1: the round has room for exactly a and b
    before = snapshot(db)
    assert c.upload(1, GOOD, key=f"{a.id}-1").status_code == 403  # c was never assigned
    assert client.get(f"/v1/devices/{a.id}", headers=c.headers).status_code == 403
    forged = {"Authorization": f"Bearer {a.token[:-2]}xx"}
    assert client.post("/v1/checkin", json={}, headers=forged).status_code == 401
    assert snapshot(db) == before
    # a's own upload still works; the key c tried is a's key, which must not block or be replayed to a
    assert a.upload(1, GOOD, key=f"{a.id}-1").status_code == 202


def test_replayed_uploads_count_once(env):
    client, _, db, (a, b, _) = env
    a.task()
    first = a.upload(1, GOOD, key="k1")
    assert first.status_code == 202
    before = snapshot(db)
    for _ in range(3):
        again = a.upload(1, GOOD, key="k1")
        assert (again.status_code, again.json()) == (202, first.json())
    assert snapshot(db) == before
    other = a.upload(1, good_update(), key="k2")
    assert other.status_code == 409 and "already uploaded" in other.json()["detail"]
    assert snapshot(db) == before
    b.task()
    assert b.upload(1, GOOD, key="kb").status_code == 202  # the round commits (goal 2)
    assert client.get("/v1/rounds/1").json()["received"] == 2
    late_replay = a.upload(1, GOOD, key="k1")  # after the commit: still the same answer, still once
    assert (late_replay.status_code, late_replay.json()) == (202, first.json())


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/admin/settings"),
        ("PATCH", "/v1/admin/settings"),
        ("POST", "/v1/admin/pause"),
        ("POST", "/v1/admin/resume"),
        ("POST", "/v1/admin/models"),
    ],
)
def test_admin_calls_need_the_admin_token(env, method, path):
    client, _, db, (a, _, _) = env
    before = snapshot(db)
    body = {"json": {"goal": 1}} if method == "PATCH" else {"content": stand_in_model_bytes(shapes=SHAPES)}
    for headers in (
        {},
        a.headers,
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {ADMIN}x"},
        {"Authorization": ADMIN},
    ):
        answer = client.request(method, path, headers=headers, **body)
        assert answer.status_code in (401, 403), (headers, answer.status_code)
        assert "admin" in answer.json()["detail"]
    assert snapshot(db) == before
    assert client.get("/v1/admin/settings", headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_a_device_that_hangs_up_mid_body_changes_nothing_and_logs_no_error(env):
    client, server, db, (a, _, _) = env
    a.task()
    before = snapshot(db)
    body = good_update()
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = errors.append
    uvicorn_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers don't propagate to the root
    uvicorn_log.addHandler(handler)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/rounds/1/updates HTTP/1.1\r\nHost: x\r\nAuthorization: "
                + a.headers["Authorization"].encode()
                + b"\r\nIdempotency-Key: cut\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body[: len(body) // 2]
            )
            time.sleep(0.2)  # the server is reading the body when the phone loses its connection
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not errors:
            if client.get("/healthz").status_code == 200:
                time.sleep(0.2)
                break
    finally:
        uvicorn_log.removeHandler(handler)
    assert snapshot(db) == before
    assert not errors, [r.getMessage() for r in errors]
    assert a.upload(1, body, key="cut").status_code == 202  # the retry with the same key is accepted once

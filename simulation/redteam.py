"""Attacks on a running coordinator, as a hostile device or a stranger on the network would make
them (issue 12). Each attack returns (held, what happened); `bench/redteam.py` runs them all
against a coordinator started with default settings, tests/test_redteam.py runs them one by one.

The attacker may hold the enrollment key (an enrolled device turned hostile) but never the admin
token; the operator's token is used only to set the scene (a fresh round: publish the latest model
again, which abandons the open round) and to check what the attack did.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np

from engine.serialize.container import MAGIC
from simulation.redteam_kit import (
    Device,
    Outcome,
    Target,
    fresh_round,
    healthz_seconds,
    play_round,
    raw_status,
    stream_body,
    tampered,
    update_for,
)


def json_body_flood(target: Target) -> Outcome:
    """57 MiB of `[],` streamed to POST /v1/devices without credentials, and a 300 MiB Content-Length."""
    probe: dict[str, float] = {}
    thread = threading.Thread(target=lambda: probe.update(seconds=(time.sleep(0.2), healthz_seconds(target))[1]))
    started = time.perf_counter()
    thread.start()
    with target.client() as client:
        try:
            status = client.post("/v1/devices", content=stream_body(57 << 20)).status_code
        except httpx.HTTPError as exc:  # the server may close the connection after its 413
            status = f"connection closed ({type(exc).__name__})"
        streamed = time.perf_counter() - started
    declared = raw_status(target, b"POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % (300 << 20))
    thread.join()
    held = status in (413, "connection closed (RemoteProtocolError)", "connection closed (WriteError)")
    held = held and declared == 413 and streamed < 5 and probe.get("seconds", 99) < 1
    return held, f"streamed body -> {status} in {streamed:.2f}s; 300 MiB declared -> {declared}; " + (
        f"/healthz meanwhile {probe.get('seconds', float('nan')):.3f}s"
    )


def oversized_headers(target: Target) -> Outcome:
    """A 1 MB header."""
    with target.client() as client:
        try:
            status = client.get("/healthz", headers={"X-Pad": "a" * 1_000_000}).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
    return status in (431, 400, "RemoteProtocolError", "ReadError"), f"1 MB header -> {status}"


def slow_headers(target: Target, timeout: float = 5.0) -> Outcome:
    """Request headers sent a byte every half second (slowloris): the connection must be closed."""
    host, port = target.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout * 4)
    started, closed = time.monotonic(), False
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while time.monotonic() - started < timeout * 3:
            try:
                sock.sendall(b"X")
                sock.settimeout(0.5)
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
    finally:
        sock.close()
    return (
        closed,
        f"slow headers: connection {'closed' if closed else 'still open'} after {time.monotonic() - started:.1f}s",
    )


def metrics_cardinality(target: Target) -> Outcome:
    """200 requests with random 8,000-character methods and random paths."""
    with target.client() as client:
        before = len(client.get("/metrics").content)
        for _ in range(200):
            client.request(secrets.token_hex(4000).upper(), "/" + secrets.token_hex(2000))
        after = len(client.get("/metrics").content)
    return after - before < 20_000, f"/metrics grew {after - before} bytes"


def unauthenticated_calls(target: Target) -> Outcome:
    """No token, a forged token, a wrong admin token, SQL in path parameters."""
    with target.client() as client:
        statuses = [
            client.post("/v1/rounds/1/updates", content=b"x", headers={"Idempotency-Key": "k"}).status_code,
            client.post("/v1/checkin", json={"eligible": True}, headers={"Authorization": "Bearer x" * 3}).status_code,
            client.patch("/v1/admin/settings", json={"goal": 1}, headers={"Authorization": "Bearer x"}).status_code,
            client.get("/v1/devices/' OR 1=1 --", headers={"Authorization": "Bearer ' OR 1=1 --"}).status_code,
        ]
    return statuses == [401, 401, 403, 401], f"statuses {statuses}"


def dashboard_headers(target: Target) -> Outcome:
    """The dashboard forbids framing and sniffing and limits what its page may load."""
    headers = httpx.get(target.url + "/").headers
    csp = headers.get("content-security-policy", "")
    held = (
        "frame-ancestors 'none'" in csp and "default-src" in csp and headers.get("x-content-type-options") == "nosniff"
    )
    return held, f"CSP {csp!r}, X-Content-Type-Options {headers.get('x-content-type-options')!r}"


# ---------------------------------------------------------------- enrolled devices turned hostile


def upload_slot_exhaustion(target: Target) -> Outcome:
    """An enrolled, unassigned device opens 16 trickling uploads to a round that does not exist
    (and 16 to the open round); a legitimate upload must still go through at once."""
    with target.client() as client:
        round_id, weights = fresh_round(target, client)
        mallory, alice = Device(client, target.enrollment_key), Device(client, target.enrollment_key)
        task = alice.task()
    statuses: list[object] = []

    def trickle(rid: int) -> None:
        with httpx.Client(base_url=target.url, timeout=30) as c:

            def body():
                for _ in range(20):
                    yield b"x" * 10
                    time.sleep(0.5)

            headers = {**mallory.headers, "Idempotency-Key": secrets.token_hex(8)}
            try:
                statuses.append(c.post(f"/v1/rounds/{rid}/updates", content=body(), headers=headers).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=trickle, args=(rid,)) for rid in [10**9] * 16 + [round_id] * 16]
    for t in threads:
        t.start()
    time.sleep(1.0)
    delta = {n: np.full(w.shape, 1e-3, np.float32) for n, w in weights.items()}
    started = time.perf_counter()
    with target.client(timeout=20) as client:
        alice.client = client
        legit = alice.upload(task["round_id"], update_for(task, delta)).status_code
    seconds = time.perf_counter() - started
    for t in threads:
        t.join()
    refused = sum(s in (403, 404, 429, "RemoteProtocolError", "WriteError") for s in statuses)
    return legit == 202 and seconds < 5 and refused == 32, (
        f"legitimate upload -> {legit} in {seconds:.2f}s; hostile uploads refused {refused}/32"
    )


def slow_body(target: Target) -> Outcome:
    """An assigned device sends its upload at 100 bytes/s: the server must give up on it (408) soon
    after the grace period instead of holding an upload slot for the ~30 minutes it would take."""
    with target.client(timeout=120) as client:
        _, weights = fresh_round(target, client)
        mallory = Device(client, target.enrollment_key)
        task = mallory.task()
        body = update_for(task, {n: np.zeros(w.shape, np.float32) for n, w in weights.items()})

        def trickle():
            for i in range(0, len(body), 50):
                yield body[i : i + 50]
                time.sleep(0.5)

        started = time.perf_counter()
        try:
            status = mallory.upload(task["round_id"], trickle()).status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        seconds = time.perf_counter() - started
    return status == 408 and seconds < 30, f"a {len(body)}-byte body at 100 bytes/s -> {status} after {seconds:.1f}s"


def container_header_bomb(target: Target) -> Outcome:
    """An assigned device sends an update whose JSON header is 20 MiB."""
    with target.client() as client:
        fresh_round(target, client)
        mallory = Device(client, target.enrollment_key)
        task = mallory.task()
        header = b'{"tensors": [' + b"[]," * (7 << 20) + b"[]]}"
        body = MAGIC + struct.pack("<IQ", 1, len(header)) + header
        probe: dict[str, float] = {}
        thread = threading.Thread(target=lambda: probe.update(seconds=(time.sleep(0.3), healthz_seconds(target))[1]))
        thread.start()
        started = time.perf_counter()
        answer = mallory.upload(task["round_id"], body)
        seconds = time.perf_counter() - started
        thread.join()
    held = answer.status_code in (413, 422) and seconds < 3 and probe.get("seconds", 99) < 1
    return held, f"20 MiB header -> {answer.status_code} in {seconds:.2f}s ({answer.text[:90]}); /healthz {probe}"


def metric_key_flood(target: Target) -> Outcome:
    """An update carrying 300,000 metric keys, and one with a 10,000-character key."""
    with target.client() as client:
        _, weights = fresh_round(target, client)
        mallory = Device(client, target.enrollment_key)
        task = mallory.task()
        delta = {n: np.zeros(w.shape, np.float32) for n, w in weights.items()}
        honest = update_for(task, delta)
        many = mallory.upload(task["round_id"], tampered(honest, metrics={f"m{i}": 1.0 for i in range(300_000)}))
        long = mallory.upload(task["round_id"], tampered(honest, metrics={"k" * 10_000: 1.0}))
    held = many.status_code in (413, 422) and long.status_code == 422
    return held, f"300,000 keys -> {many.status_code}; 10,000-character key -> {long.status_code}"


def idempotency_key_reuse(target: Target) -> Outcome:
    """The same Idempotency-Key with a different body."""
    with target.client() as client:
        _, weights = fresh_round(target, client)
        mallory = Device(client, target.enrollment_key)
        task = mallory.task()
        small = {n: np.full(w.shape, 1e-4, np.float32) for n, w in weights.items()}
        first = mallory.upload(task["round_id"], update_for(task, small), key="same-key")
        again = mallory.upload(task["round_id"], update_for(task, small), key="same-key")
        other = mallory.upload(task["round_id"], update_for(task, {n: -v for n, v in small.items()}), key="same-key")
    held = (first.status_code, again.status_code, other.status_code) == (202, 202, 422)
    return held, f"first {first.status_code}, same body {again.status_code}, other body {other.status_code}"


def model_takeover(target: Target) -> Outcome:
    """One enrolled device tries to replace the global model: 1,000,000 claimed samples with delta -w;
    then, in the next round, an honest count with delta -3w, and another with a random delta of norm
    9,990 (under the old max_update_norm). The model may move by honest-update scale, not by w."""

    def minus(k):
        return lambda w: {n: (-k * v).astype(np.float32) for n, v in w.items()}

    def big(w):
        rng = np.random.default_rng(1)
        d = {n: rng.normal(0, 1, v.shape) for n, v in w.items()}
        scale = 9990 / np.sqrt(sum(float(np.sum(x**2)) for x in d.values()))
        return {n: (x * scale).astype(np.float32) for n, x in d.items()}

    first = play_round(target, [(minus(1), 1_000_000)])
    second = play_round(target, [(minus(3), 100), (big, 100)])
    ratios = [moved / norm for moved, norm in (first, second)]
    return all(r < 0.1 for r in ratios), (
        f"model moved by {ratios[0]:.4f} x |w| (count 1e6, -w) and {ratios[1]:.4f} x |w| (-3w; norm 9990); "
        "an undefended FedAvg moves it by ~1.0 and ~3"
    )


def round_view_leak(target: Target) -> Outcome:
    """A stranger reads a committed round: it must show aggregates, not who sent what."""
    with target.client() as client:
        rounds = client.get("/v1/rounds", params={"limit": 1000}).json()
        views = [client.get(f"/v1/rounds/{r['id']}").json() for r in rounds[:20]]
    leaked = [v["id"] for v in views if v.get("participants")]
    return not leaked and bool(views), f"{len(views)} rounds read without a token; per-device detail in {leaked}"


def enrollment_flood(target: Target) -> Outcome:
    """Enrollments as fast as one address can send them, and wrong keys guessed as fast."""
    with target.client() as client:
        statuses = [
            client.post("/v1/devices", json={"enrollment_key": target.enrollment_key}).status_code for _ in range(80)
        ]
        guesses = [client.post("/v1/devices", json={"enrollment_key": secrets.token_hex(8)}) for _ in range(30)]
    limited = statuses.count(429)
    guessed = [g.status_code for g in guesses]
    retry = next((g.headers.get("retry-after") for g in guesses if g.status_code == 429), None)
    held = limited > 0 and 201 not in guessed and guessed.count(429) >= 15 and retry is not None
    return held, f"80 enrollments: {limited} got 429; 30 wrong keys: {guessed.count(429)} got 429 (Retry-After {retry})"


def weak_secrets(target: Target) -> Outcome:
    """Starting a coordinator with a one-character enrollment key or admin token (and the old compose default)."""
    import subprocess
    import sys
    import tempfile

    codes = []
    for flags in (["--enrollment-key", "k"], ["--admin-token", "a"], ["--enrollment-key", "change-me"]):
        with tempfile.TemporaryDirectory() as workdir:
            done = subprocess.run(
                [sys.executable, "-m", "coordinator", "--port", "0", "--db", f"{workdir}/x.db", *flags],
                capture_output=True,
                text=True,
                timeout=60,
            )
        codes.append((done.returncode, "weak secrets" in done.stderr))
    return all(code != 0 and said for code, said in codes), f"(exit status, said why): {codes}"


def enrollment_code_reuse(target: Target) -> Outcome:
    """A one-time enrollment code used twice, and a revoked device's token."""
    with target.client() as client:
        minted = client.post("/v1/admin/enrollment-codes", json={"count": 1}, headers=target.admin)
        code = minted.json()["codes"][0]
        first = client.post("/v1/devices", json={"enrollment_key": code})
        second = client.post("/v1/devices", json={"enrollment_key": code})
        device = first.json()
        headers = {"Authorization": f"Bearer {device['token']}"}
        before = client.post("/v1/checkin", json={"eligible": False}, headers=headers).status_code
        revoked = client.delete(f"/v1/devices/{device['device_id']}", headers=target.admin).status_code
        by_device = client.delete(f"/v1/devices/{device['device_id']}", headers=headers).status_code
        after = client.post("/v1/checkin", json={"eligible": False}, headers=headers).status_code
        other = Device(client, target.enrollment_key)
        rotated = client.post(f"/v1/devices/{other.id}/token", headers=other.headers)
        old_token = client.post("/v1/checkin", json={"eligible": False}, headers=other.headers).status_code
        new_headers = {"Authorization": f"Bearer {rotated.json()['token']}"}
        new_token = client.post("/v1/checkin", json={"eligible": False}, headers=new_headers).status_code
    got = (first.status_code, second.status_code, before, revoked, by_device, after, old_token, new_token)
    return got == (201, 401, 200, 204, 403, 401, 401, 200), (
        "code: first use, second use; token before revoke, revoke, revoke by the device itself, token after; "
        f"after rotation: old token, new token: {got}"
    )


ATTACKS: dict[str, Callable[[Target], Outcome]] = {
    "json_body_flood": json_body_flood,
    "oversized_headers": oversized_headers,
    "slow_headers": slow_headers,
    "metrics_cardinality": metrics_cardinality,
    "unauthenticated_calls": unauthenticated_calls,
    "upload_slot_exhaustion": upload_slot_exhaustion,
    "slow_body": slow_body,
    "container_header_bomb": container_header_bomb,
    "metric_key_flood": metric_key_flood,
    "idempotency_key_reuse": idempotency_key_reuse,
    "model_takeover": model_takeover,
    "round_view_leak": round_view_leak,
    "dashboard_headers": dashboard_headers,
    "enrollment_code_reuse": enrollment_code_reuse,
    "weak_secrets": weak_secrets,
    "enrollment_flood": enrollment_flood,  # last: it leaves this address rate-limited for a minute
}


def run(name: str, target: Target) -> dict:
    """One attack as a JSON-able record; an attack that crashes counts as not held."""
    started = time.perf_counter()
    try:
        held, detail = ATTACKS[name](target)
    except Exception as exc:  # noqa: BLE001 -- a crash is reported, not raised
        held, detail = False, f"attack raised {type(exc).__name__}: {exc}"
    return {"attack": name, "held": bool(held), "detail": detail, "seconds": round(time.perf_counter() - started, 2)}


def summary(records: list[dict]) -> dict:
    return {
        "attacks": len(records),
        "held": sum(r["held"] for r in records),
        "failed": [r["attack"] for r in records if not r["held"]],
    }


def dumps_line(record: dict) -> str:
    return json.dumps(record, sort_keys=False)

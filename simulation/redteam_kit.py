"""What the red team's attacks (simulation/redteam.py) stand on: the target, a hostile enrolled
device, a fresh round to attack, and raw requests below what httpx would send."""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass

import httpx
import numpy as np

from engine.serialize.container import dumps, loads
from protocol.update import encode_update

Outcome = tuple[bool, str]


@dataclass
class Target:
    url: str
    enrollment_key: str
    admin_token: str

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}


class Device:
    """An enrolled device under the attacker's control."""

    def __init__(self, client: httpx.Client, key: str):
        answer = client.post("/v1/devices", json={"enrollment_key": key, "name": "mallory"})
        answer.raise_for_status()
        self.client, self.id, self.token = client, answer.json()["device_id"], answer.json()["token"]
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def task(self) -> dict:
        answer = self.client.post("/v1/checkin", json={"eligible": True, "num_samples": 100}, headers=self.headers)
        answer.raise_for_status()
        body = answer.json()
        if body["status"] != "task":
            raise RuntimeError(f"expected a task, got {body}")
        return body["task"]

    def upload(self, round_id: int, body: bytes, key: str | None = None, **kw) -> httpx.Response:
        headers = {**self.headers, "Idempotency-Key": key or secrets.token_hex(8)}
        return self.client.post(f"/v1/rounds/{round_id}/updates", content=body, headers=headers, **kw)


def fresh_round(target: Target, client: httpx.Client) -> tuple[int, dict[str, np.ndarray]]:
    """Publish the latest model again (the open round is abandoned); (new round id, its weights)."""
    latest = client.get("/v1/models/latest").json()["version"]
    data = client.get(f"/v1/models/{latest}", headers=target.admin).content
    published = client.post("/v1/admin/models", content=data, headers=target.admin)
    published.raise_for_status()
    version = published.json()["version"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rounds = client.get("/v1/rounds", params={"limit": 1}).json()
        if rounds and rounds[0]["status"] == "open" and rounds[0]["base_version"] == version:
            weights = loads(client.get(f"/v1/models/{version}", headers=target.admin).content).tensors
            return rounds[0]["id"], weights
        time.sleep(0.05)
    raise RuntimeError("no round opened on the republished model")


def update_for(task: dict, delta: dict[str, np.ndarray], sample_count: int = 100, **kw) -> bytes:
    return encode_update(
        delta, sample_count=sample_count, round_id=task["round_id"], base_version=task["base_version"], **kw
    )


def healthz_seconds(target: Target) -> float:
    started = time.perf_counter()
    httpx.get(target.url + "/healthz", timeout=60).raise_for_status()
    return time.perf_counter() - started


def stream_body(total: int, chunk: bytes = b"[]," * 21_000):
    sent = 0
    while sent < total:
        yield chunk
        sent += len(chunk)


# ---------------------------------------------------------------- strangers (no credentials)


def raw_status(target: Target, request: bytes) -> int | str:
    """Send raw bytes, read the status line (the server must answer without the rest of the body)."""
    host, port = target.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        try:
            line = sock.recv(64).split(b"\r\n")[0].split()
        except TimeoutError:
            return "no answer"
    return int(line[1]) if len(line) > 1 else "closed"


def tampered(body: bytes, **metadata) -> bytes:
    """An encoded update with metadata fields replaced (bypassing the encoder's own checks)."""
    container = loads(body)
    return dumps(container.tensors, {**container.metadata, **metadata}, kind="update")


def play_round(target: Target, hostile: list[tuple[dict, int]]) -> tuple[float, float]:
    """A fresh round of `goal` updates: the hostile (delta from the base weights w -> delta, sample
    count) ones first, honest small deltas (norm ~0.05, 100 samples) for the rest. Returns
    (|w_new - w|, |w|) once it commits."""
    with target.client() as client:
        round_id, weights = fresh_round(target, client)
        goal = client.get(f"/v1/rounds/{round_id}").json()["goal"]
        devices = [Device(client, target.enrollment_key) for _ in range(goal)]
        tasks = [d.task() for d in devices]
        rng = np.random.default_rng(round_id)
        size = sum(w.size for w in weights.values())
        for i, (device, task) in enumerate(zip(devices, tasks, strict=True)):
            if i < len(hostile):
                make, count = hostile[i]
                delta, samples = make(weights), count
            else:
                delta = {n: rng.normal(0, 0.05 / np.sqrt(size), w.shape).astype(np.float32) for n, w in weights.items()}
                samples = 100
            answer = device.upload(task["round_id"], update_for(task, delta, sample_count=samples))
            if answer.status_code != 202:
                raise RuntimeError(f"upload {i} refused: {answer.status_code} {answer.text[:200]}")
        deadline = time.monotonic() + 30
        while (r := client.get(f"/v1/rounds/{round_id}").json())["status"] == "open" and time.monotonic() < deadline:
            time.sleep(0.05)
        if r["status"] != "committed":
            raise RuntimeError(f"round {round_id} did not commit: {r['status']} {r.get('reason')}")
        new = loads(client.get(f"/v1/models/{r['result_version']}", headers=target.admin).content).tensors
    moved = float(np.sqrt(sum(float(np.sum((new[n].astype(np.float64) - w) ** 2)) for n, w in weights.items())))
    norm = float(np.sqrt(sum(float(np.sum(w.astype(np.float64) ** 2)) for w in weights.values())))
    return moved, norm

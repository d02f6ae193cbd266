"""Helpers for tests, simulations and benchmarks: a stand-in model file, a fake clock, a real
uvicorn server on a free loopback port in a background thread, and `tick(app)` to settle rounds
at once (what the background ticker does every tick_interval) after moving a fake clock."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import uvicorn

from coordinator.serving import server_config
from engine.serialize.container import dumps

LENET_SHAPES = {
    "conv1.weight": (6, 1, 5, 5),
    "conv1.bias": (6,),
    "conv2.weight": (16, 6, 5, 5),
    "conv2.bias": (16,),
    "fc1.weight": (120, 256),
    "fc1.bias": (120,),
    "fc2.weight": (84, 120),
    "fc2.bias": (84,),
    "fc3.weight": (10, 84),
    "fc3.bias": (10,),
}


def stand_in_model_bytes(seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None) -> bytes:
    """A model file with LeNet-sized float32 tensors and an opaque graph (the server never reads it)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or LENET_SHAPES
    tensors = {name: (rng.standard_normal(shape) * 0.1).astype(np.float32) for name, shape in shapes.items()}
    metadata = {
        "format": "pocketfed-model",
        "format_version": 1,
        "architecture": "lenet-standin",
        "graph": {"nodes": []},
        "inputs": ["x"],
        "outputs": ["logits"],
        "trainable": list(shapes),
        "created_at": "2024-01-01T00:00:00+00:00",
        "version": 0,
    }
    return dumps(tensors, metadata, kind="model")


class FakeClock:
    """A clock tests move by hand (deadlines without sleeping)."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def tick(app) -> None:
    """Settle the app's rounds now, on this thread: deadlines passed on a FakeClock, goals reached."""
    app.state.services.tick()


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1:<free port> until stop()."""

    def __init__(self, app, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        settings = getattr(getattr(app.state, "services", None), "settings", None)
        if settings is None:  # not a coordinator app
            config = uvicorn.Config(app, log_level="warning", access_log=False, http="h11")
        else:
            config = server_config(app, settings, log_level="warning", host=host, port=0)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def random_delta(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in shapes.items()}


class TestDevice:
    """A minimal device speaking the HTTP API with httpx (enroll, check in, upload)."""

    __test__ = False  # not a pytest test class

    def __init__(self, client, enrollment_key: str, name: str | None = None):
        answer = client.post("/v1/devices", json={"enrollment_key": enrollment_key, "name": name})
        answer.raise_for_status()
        self.client = client
        self.id, self.token = answer.json()["device_id"], answer.json()["token"]
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def checkin(self, eligible: bool = True):
        return self.client.post("/v1/checkin", json={"eligible": eligible, "num_samples": None}, headers=self.headers)

    def task(self) -> dict:
        answer = self.checkin()
        answer.raise_for_status()
        body = answer.json()
        if body["status"] != "task":
            raise AssertionError(f"expected a task, got {body}")
        return body["task"]

    def upload(self, round_id: int, body: bytes, key: str | None = None):
        return self.client.post(
            f"/v1/rounds/{round_id}/updates",
            content=body,
            headers={
                **self.headers,
                "Idempotency-Key": key or f"{self.id}-{round_id}",
                "Content-Type": "application/octet-stream",
            },
        )

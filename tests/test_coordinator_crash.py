"""Kill -9 the coordinator between accepted updates and in the middle of a commit, restart it on the
same database, and check the committed model equals an uninterrupted run's: no update lost or doubled."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from coordinator.api import create_app
from coordinator.settings import Settings
from coordinator.testing import LENET_SHAPES, ServerThread, TestDevice, random_delta, stand_in_model_bytes
from engine.serialize.container import loads
from protocol.update import encode_update

ROOT = Path(__file__).resolve().parents[1]
KEY = "crash-enrollment-key-k7Qx9Lm2Pw4Z"
SAMPLES = [12, 5, 40]
OPTIONS = {"goal": 3, "deadline": 3600, "strategy": "fedavgm", "server_lr": 0.8, "server_momentum": 0.5}


def bodies():
    """The three devices' updates for round 1, identical in both runs."""
    return [
        encode_update(
            random_delta(LENET_SHAPES, seed=i, scale=0.05),
            sample_count=n,
            round_id=1,
            base_version=0,
            encoding="float16" if i == 1 else "float32",
        )
        for i, n in enumerate(SAMPLES)
    ]


def first_round_formula(base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FedAvgM's first round under the default influence bound (issue 12): with no reference round
    every delta is clipped to 0.2x the model's L2 norm and every device weighs the same, so the
    new model is base + lr * the plain mean of the clipped deltas (the sample counts do not count)."""
    bound = 0.2 * math.sqrt(sum(float(np.sum(base[n].astype(np.float64) ** 2)) for n in LENET_SHAPES))
    clipped = []
    for i in range(len(SAMPLES)):
        delta = {k: v.astype(np.float64) for k, v in random_delta(LENET_SHAPES, seed=i, scale=0.05).items()}
        norm = math.sqrt(sum(float(np.sum(v**2)) for v in delta.values()))
        clipped.append({k: v * min(1.0, bound / norm) for k, v in delta.items()})
    return {n: base[n] + 0.8 * sum(d[n] for d in clipped) / len(clipped) for n in LENET_SHAPES}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Coordinator:
    """`python -m coordinator` in a subprocess, on a fixed port and database."""

    def __init__(self, tmp_path: Path, model: Path):
        self.tmp_path, self.model, self.port = tmp_path, model, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, crash_point: str | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PF_ENROLLMENT_KEY": KEY}
        env.pop("PF_TEST_CRASH_POINT", None)
        if crash_point:
            env["PF_TEST_CRASH_POINT"] = crash_point
        args = [
            sys.executable,
            "-m",
            "coordinator",
            "--port",
            str(self.port),
            "--db",
            str(self.tmp_path / "c.db"),
            "--model",
            str(self.model),
            "--log-level",
            "warning",
        ]
        args += [a for k, v in OPTIONS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        self.starts += 1
        log = open(self.tmp_path / f"coordinator-{self.starts}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError(f"coordinator did not come up: {self.log()}")

    def log(self) -> str:
        return (self.tmp_path / f"coordinator-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def wait_crashed(self) -> None:
        assert self.proc.wait(timeout=20) == 137, self.log()  # os._exit(137) at the crash point


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "base.pfmodel"
    path.write_bytes(stand_in_model_bytes(seed=5))
    return path


def reference_weights(tmp_path, model):
    """The same round, uninterrupted, in-process."""
    settings = Settings(db=str(tmp_path / "ref.db"), model=str(model), enrollment_key=KEY, **OPTIONS)
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as client:
        devices = [TestDevice(client, KEY) for _ in SAMPLES]
        for device, body in zip(devices, bodies(), strict=True):
            device.task()
            assert device.upload(1, body).status_code == 202
        return loads(client.get("/v1/models/1", headers=devices[0].headers).content).tensors


def test_kill_between_updates_and_during_commit(tmp_path, model):
    expected = reference_weights(tmp_path, model)
    updates = bodies()
    server = Coordinator(tmp_path, model)
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            devices = [TestDevice(client, KEY) for _ in SAMPLES]
            assert [d.task()["round_id"] for d in devices] == [1, 1, 1]
            first = devices[0].upload(1, updates[0], key="u0")
            assert first.json()["received"] == 1
            server.kill()  # between accepted updates

            server.start(crash_point="before_update_commit")  # dies inside the update's transaction
            with pytest.raises(httpx.TransportError):
                devices[1].upload(1, updates[1], key="u1")
            server.wait_crashed()

            server.start()
            assert client.get("/v1/rounds/1").json()["received"] == 1  # u0 kept, u1 rolled back
            assert devices[0].upload(1, updates[0], key="u0").json() == first.json()  # replay: counted once
            assert devices[1].upload(1, updates[1], key="u1").json()["received"] == 2  # the device's retry
            server.kill()

            server.start(crash_point="before_register_model")  # dies between model file and registration
            with pytest.raises(httpx.TransportError):
                devices[2].upload(1, updates[2], key="u2")
            server.wait_crashed()
            assert (tmp_path / "c.models" / "v000001.pfmodel").exists()  # written, never registered

            server.start()  # recovery: the orphan goes, the full round commits again
            r1 = client.get("/v1/rounds/1").json()
            assert (r1["status"], r1["received"], r1["result_version"]) == ("committed", 3, 1)
            assert r1["total_samples"] == sum(SAMPLES)
            assert devices[2].upload(1, updates[2], key="u2").json() == {
                "accepted": True,
                "round_id": 1,
                "received": 3,
                "goal": 3,
            }
            assert client.get("/v1/rounds/2").json()["status"] == "open"  # the next round opened
            latest = client.get("/v1/models/latest", headers=devices[0].headers).json()
            assert latest["version"] == 1
            got = loads(client.get("/v1/models/1", headers=devices[0].headers).content).tensors
            for name in LENET_SHAPES:
                np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
            want = first_round_formula(loads(model.read_bytes()).tensors)
            for name in LENET_SHAPES:  # and both equal the formula
                np.testing.assert_allclose(got[name], want[name], atol=1e-4, err_msg=name)
            assert not any(p.name.startswith(".") for p in (tmp_path / "c.models").iterdir())
    finally:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()

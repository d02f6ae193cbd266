"""A secure-aggregation round survives kill -9 of the coordinator (a real `python -m coordinator` process)
between phases and in the middle of two phases: restarted on the same database it resumes, replays
count once, the unmask requests are the ones it had made before (the survivor set is durable, so it
never asks for both secrets of one device), and the committed model is the cohort's weighted mean."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from coordinator.testing import random_delta, stand_in_model_bytes
from device_agent.client import CoordinatorClient, RetryPolicy
from device_agent.secagg import vector_of
from engine.serialize.container import loads
from protocol.secagg import ClientSession, Quantizer

ROOT = Path(__file__).resolve().parents[1]
KEY = "secagg-crash-test-enrollment-key"  # strong enough for pf-coordinator (no --insecure-dev)
SHAPES = {"w": (8, 6), "b": (6,)}
SAMPLES = [7, 30, 12, 2]
DELTAS = [random_delta(SHAPES, seed=10 + i, scale=0.05) for i in range(4)]


class Coordinator:
    def __init__(self, tmp_path: Path, model: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp_path, self.model, self.proc, self.starts = tmp_path, model, None, 0

    def start(self) -> None:
        args = [sys.executable, "-m", "coordinator", "--port", str(self.port), "--db", str(self.tmp_path / "c.db")]
        args += ["--model", str(self.model), "--enrollment-key", KEY, "--secure-aggregation", "--goal", "4"]
        args += ["--over-select", "1", "--deadline", "3600", "--secagg-phase-timeout", "600", "--log-level", "warning"]
        args += ["--tick-interval", "0.1"]
        self.starts += 1
        log = open(self.tmp_path / f"coordinator-{self.starts}.log", "wb")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.tmp_path / f"coordinator-{self.starts}.log").read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise RuntimeError("coordinator did not come up")

    def restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL
        self.start()


def test_kill_between_and_within_phases_resumes_and_unmasks_only_the_sum(tmp_path):
    model = tmp_path / "m.pfmodel"
    model.write_bytes(stand_in_model_bytes(seed=3, shapes=SHAPES))
    server = Coordinator(tmp_path, model)
    server.start()
    clients = []
    try:
        for _ in range(4):
            client = CoordinatorClient(server.url, retry=RetryPolicy(attempts=6))
            client.token = client.enroll(KEY)[1]
            clients.append(client)
        assert all(c.checkin(10).task.secure_aggregation for c in clients)
        for c in clients:
            c.secagg_join(1)
        statuses = [c.secagg_status(1) for c in clients]
        assert {s["phase"] for s in statuses} == {"advertise"}
        sessions = [ClientSession(s["config"], s["index"]) for s in statuses]
        for c, s in zip(clients, sessions, strict=True):
            c.secagg_send(1, "advertise", s.advertise())

        server.restart()  # between phases: keys advertised, shares not yet sent
        statuses = [c.secagg_status(1) for c in clients]
        assert {s["phase"] for s in statuses} == {"share_keys"}
        for c, s, st in zip(clients, sessions, statuses, strict=True):
            c.secagg_send(1, "shares", s.share_keys(st["message"]))
        statuses = [c.secagg_status(1) for c in clients]
        assert {s["phase"] for s in statuses} == {"masked_input"}
        frames = [
            s.masked_input(st["message"], vector_of(d, st["layout"]), n)
            for s, st, d, n in zip(sessions, statuses, DELTAS, SAMPLES, strict=True)
        ]
        for i in (0, 1):
            assert clients[i].secagg_send(1, "masked_input", frames[i])["accepted"] is True

        server.restart()  # within the masked-input phase: two of four vectors accepted
        assert clients[0].secagg_send(1, "masked_input", frames[0])["accepted"] is False  # a replay, counted once
        for i in (2, 3):
            clients[i].secagg_send(1, "masked_input", frames[i])
        requests = [c.secagg_status(1)["message"] for c in clients]
        assert {m["type"] for m in requests} == {"unmask_request"}
        for i in (0, 1):
            clients[i].secagg_send(1, "unmask", sessions[i].unmask(requests[i]))

        server.restart()  # within the unmask phase: the same requests again, never other ones
        again = [c.secagg_status(1) for c in clients]
        assert [s["message"] for s in again] == requests and [s["waiting"] for s in again] == [False, False, True, True]
        for i in (2, 3):
            clients[i].secagg_send(1, "unmask", sessions[i].unmask(requests[i]))
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {clients[0].token}"}) as http:
            for _ in range(100):
                detail = http.get("/v1/rounds/1").json()
                if detail["status"] != "open":
                    break
                time.sleep(0.1)
            assert detail["status"] == "committed" and detail["received"] == 4, detail
            got = loads(http.get("/v1/models/1").content).tensors
        base = loads(model.read_bytes()).tensors
        bound = Quantizer().mean_error_bound(4, sum(SAMPLES))  # stochastic rounding: one step per device
        for name in SHAPES:
            mean = sum(n * d[name].astype(np.float64) for n, d in zip(SAMPLES, DELTAS, strict=True)) / sum(SAMPLES)
            np.testing.assert_allclose(got[name], base[name] + mean, rtol=0, atol=bound + 1e-6)
    finally:
        for c in clients:
            c.close()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=10)

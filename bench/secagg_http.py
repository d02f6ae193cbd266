"""Real rounds over HTTP for bench/secagg.py: a plain round and a secure-aggregation round of n devices
against a real coordinator process (`python -m coordinator`, SQLite in a temporary directory).

Each device is a thread of this process speaking the HTTP API with the agent's own client
(device_agent/client.py) and, for secure aggregation, device_agent/secagg.py: bytes up and down are
counted on the wire (request and response bodies, HTTP headers excluded; the model download, the same
in both, is left out), device CPU is each thread's own CPU time, coordinator CPU is read from
/proc/<pid>/stat around the round, and the round's wall time runs from the first check-in to the
round being committed. All devices share this process's cores and its GIL (and the machine's cores
with the coordinator), so a round's wall time here includes every device's work done one after
another, where a fleet of phones works in parallel; local training is not part of either round.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from device_agent.client import CoordinatorClient, RetryPolicy
from device_agent.secagg import SecAggParticipant
from protocol.update import encode_update

ROOT = Path(__file__).resolve().parents[1]
KEY = secrets.token_urlsafe(24)  # pf-coordinator refuses weak enrollment keys
TICKS = os.sysconf("SC_CLK_TCK")


class Coordinator:
    def __init__(self, workdir: Path, n: int, secure: bool):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "coordinator", "--port", str(port), "--db", str(workdir / "c.db")]
        args += ["--model", "lenet", "--enrollment-key", KEY, "--goal", str(n), "--over-select", "1"]
        args += ["--deadline", "1200", "--tick-interval", "0.05", "--log-level", "warning", "--strategy", "fedavg"]
        args += ["--min-retry-after", "0", "--max-retry-after", "1", "--max-concurrent-uploads", "32"]
        args += ["--enroll-per-address", "100000"]  # the whole fleet enrolls from this one address
        if secure:
            args += ["--secure-aggregation", "--secagg-phase-timeout", "300"]
        self.log = open(workdir / "coordinator.log", "wb")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise SystemExit(f"the coordinator did not start: {(workdir / 'coordinator.log').read_text()[-2000:]}")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Counted:
    """httpx event hooks adding up request and response body bytes."""

    def __init__(self):
        self.up = self.down = 0

    def request(self, request: httpx.Request) -> None:
        self.up += len(request.content)

    def response(self, response: httpx.Response) -> None:
        response.read()
        self.down += len(response.content)

    def hooks(self) -> dict:
        return {"request": [self.request], "response": [self.response]}


def http_round(n: int, delta: dict[str, np.ndarray], samples: int, secure: bool) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="pf-secagg-bench-"))
    server = Coordinator(workdir, n, secure)
    try:
        counters = [Counted() for _ in range(n)]
        clients = [
            CoordinatorClient(server.url, retry=RetryPolicy(attempts=8), event_hooks=c.hooks(), timeout=120)
            for c in counters
        ]
        for client in clients:
            client.token = client.enroll(KEY)[1]
        for c in counters:
            c.up = c.down = 0  # enrollment is not part of a round
        cpu = [0.0] * n
        outcomes: list = [None] * n

        def device(i: int) -> None:
            start = time.thread_time()
            task = clients[i].checkin(samples).task
            if secure:
                outcomes[i] = SecAggParticipant(clients[i], task.round_id, task.deadline).run(delta, samples)
            else:
                body = encode_update(delta, sample_count=samples, round_id=task.round_id, base_version=0)
                clients[i].upload(task.round_id, body, f"bench-{i}")
                outcomes[i] = "done"
            cpu[i] = time.thread_time() - start

        server_cpu = server.cpu_s()
        wall = time.perf_counter()
        threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {clients[0].token}"}) as http:
            while (detail := http.get("/v1/rounds/1").json())["status"] == "open":
                time.sleep(0.02)
        wall = time.perf_counter() - wall
        server_cpu = server.cpu_s() - server_cpu
        if detail["status"] != "committed" or detail["received"] != n:
            raise SystemExit(f"{'secure' if secure else 'plain'} round of {n}: {detail['status']} {detail['reason']}")
        for client in clients:
            client.close()
        return {
            "bytes_up": statistics.mean(c.up for c in counters),
            "bytes_down": statistics.mean(c.down for c in counters),
            "device_cpu_s": statistics.mean(cpu),
            "coordinator_cpu_s": server_cpu,
            "round_wall_s": wall,
        }
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

"""Real rounds over HTTP for bench/secagg.py: a plain round and a secure-aggregation round of n devices
against a real coordinator process (`python -m coordinator`, SQLite in a temporary directory).

Each device is a thread speaking the HTTP API with the agent's own client (device_agent/client.py)
and, for secure aggregation, device_agent/secagg.py. With `workers=0` all devices are threads of this
process (sharing its GIL: their work is serialized); with `workers=W` they are spread over W worker
processes, closer to a fleet of phones working in parallel -- but this machine has 2 cores, shared by
the coordinator, the workers and whatever else runs, so the fleet's work still queues for 2 cores.
With `train=True` each device also trains one local epoch on its own 600-sample shard between
check-in and upload/join (the round a user sees); otherwise every device sends the same ready delta
(the protocol-only round).

Measured: bytes up and down on the wire (request and response bodies, HTTP headers excluded; the
model download, the same in both modes, is left out), device CPU (each device thread's own CPU time,
training reported apart), coordinator CPU from /proc/<pid>/stat around the round, and the round's
wall time from the moment every device is ready (clients made, model built) to the round committed.
"""

from __future__ import annotations

import multiprocessing
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
        deadline = time.monotonic() + 300  # a loaded shared machine can take a minute to import it all
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.proc.kill()  # do not leave it running
        self.log.close()
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


def _device_threads(url, tokens, first, samples, secure, delta, train, ready, go, results) -> None:
    """Run devices first, first+1, ... (one thread each) once `go` is set; put one dict per device."""
    counters = [Counted() for _ in tokens]
    clients = [
        CoordinatorClient(url, token=tok, retry=RetryPolicy(attempts=8), event_hooks=c.hooks(), timeout=300)
        for tok, c in zip(tokens, counters, strict=True)
    ]
    trainers = [_trainer() for _ in tokens] if train else None
    data = _shards() if train else None
    out: list = [None] * len(tokens)

    def device(j: int) -> None:
        start = time.thread_time()
        task = clients[j].checkin(samples).task
        train_cpu = 0.0
        mine = delta
        if train:
            t0 = time.thread_time()
            mine = _train(trainers[j], data, first + j, samples)
            train_cpu = time.thread_time() - t0
        if secure:
            outcome = SecAggParticipant(clients[j], task.round_id, task.deadline).run(mine, samples).status
        else:
            body = encode_update(mine, sample_count=samples, round_id=task.round_id, base_version=0)
            clients[j].upload(task.round_id, body, f"bench-{first + j}")
            outcome = "done"
        total = time.thread_time() - start
        out[j] = {"cpu": total - train_cpu, "train_cpu": train_cpu, "up": 0, "down": 0, "outcome": outcome}

    ready()
    go()
    threads = [threading.Thread(target=device, args=(j,)) for j in range(len(tokens))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, c in enumerate(counters):
        out[j].update(up=c.up, down=c.down)
        clients[j].close()
    results(out)


def _worker(url, tokens, first, samples, secure, delta, train, queue, go) -> None:
    """A worker process: its devices as threads; reports 'ready', then its devices' results."""
    _device_threads(url, tokens, first, samples, secure, delta, train, lambda: queue.put("ready"), go.wait, queue.put)


def _trainer():
    from engine.models import build
    from engine.optimizer import SGD
    from engine.trainer import Trainer

    return Trainer(build("lenet", seed=0), optimizer=SGD(0.05, momentum=0.9), batch_size=32)


def _shards():
    from engine.data import load_default

    return load_default("train")


def _train(trainer, data, i: int, samples: int) -> dict[str, np.ndarray]:
    """One local epoch on device i's shard (samples i*600.. of the embedded set, wrapping around)."""
    from engine.data import Subset

    base = {k: v.copy() for k, v in trainer.get_weights().items()}
    trainer.fit(Subset(data, (np.arange(samples) + i * samples) % data.size()), epochs=1)
    weights = trainer.get_weights()
    return {k: (weights[k] - base[k]).astype(np.float32) for k in base}


def http_round(
    n: int, delta: dict[str, np.ndarray], samples: int, secure: bool, *, workers: int = 0, train: bool = False
) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="pf-secagg-bench-"))
    server = Coordinator(workdir, n, secure)
    try:
        with CoordinatorClient(server.url, retry=RetryPolicy(attempts=8)) as enroller:
            tokens = [enroller.enroll(KEY)[1] for _ in range(n)]  # enrollment is not part of a round
        per_device: list = []
        if workers:
            ctx = multiprocessing.get_context("spawn")
            queue, go = ctx.Queue(), ctx.Event()
            chunks = [list(range(n))[w::workers] for w in range(workers)]
            procs = [
                ctx.Process(
                    target=_worker,
                    args=(server.url, [tokens[i] for i in c], c[0], samples, secure, delta, train, queue, go),
                )
                for c in chunks
                if c
            ]
            for p in procs:
                p.start()
            for _ in procs:
                if queue.get(timeout=600) != "ready":
                    raise SystemExit("a bench worker failed to start")
            server_cpu, wall = server.cpu_s(), time.perf_counter()
            go.set()
            for _ in procs:
                per_device += queue.get(timeout=1800)
            for p in procs:
                p.join()
        else:
            started = threading.Event()
            box: dict = {}

            def start() -> None:
                box["cpu"], box["wall"] = server.cpu_s(), time.perf_counter()

            _device_threads(server.url, tokens, 0, samples, secure, delta, train, start, started.set, per_device.extend)
            server_cpu, wall = box["cpu"], box["wall"]
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[0]}"}) as http:
            while (detail := http.get("/v1/rounds/1").json())["status"] == "open":
                time.sleep(0.02)
        wall = time.perf_counter() - wall
        server_cpu = server.cpu_s() - server_cpu
        if detail["status"] != "committed" or detail["received"] != n:
            raise SystemExit(f"{'secure' if secure else 'plain'} round of {n}: {detail['status']} {detail['reason']}")
        return {
            "bytes_up": statistics.mean(d["up"] for d in per_device),
            "bytes_down": statistics.mean(d["down"] for d in per_device),
            "device_cpu_s": statistics.mean(d["cpu"] for d in per_device),
            "device_train_cpu_s": statistics.mean(d["train_cpu"] for d in per_device),
            "coordinator_cpu_s": server_cpu,
            "round_wall_s": wall,
        }
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

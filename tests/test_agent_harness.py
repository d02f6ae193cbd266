"""Harness for the agent's integration tests: a real coordinator process, a byte-recording TCP
proxy, per-device data shards and agent processes. Imported by the other test_agent_* files; the
tests here check the harness itself (a recorder that lost bytes would make the privacy test lie).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENROLL_KEY = "test-enrollment-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------- the coordinator


class Coordinator:
    """`python -m coordinator` on loopback with a fresh SQLite database."""

    def __init__(self, workdir: Path, port: int | None = None, **options):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.options = {
            "goal": 3,
            "min_devices": 1,  # tests run rounds of one or two agents
            "over_select": 1.0,
            "deadline": 120,
            "min_retry_after": 0,
            "max_retry_after": 2,
            "tick_interval": 0.2,
            "batch_size": 16,
            "lr": 0.05,
            "momentum": 0.9,
            "enrollment_key": ENROLL_KEY,
            "db": str(workdir / "coord.db"),
            "log_level": "warning",
            **options,
        }
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Coordinator:
        args = [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.options.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        self.log = open(self.workdir / f"coordinator-{self.port}.log", "ab")  # noqa: SIM115 (lives with proc)
        self.proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            wait_until(self.healthy, 60, "the coordinator to answer /healthz")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"coordinator exited with {self.proc.returncode}: {self.log_text()}")
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self) -> str:
        return (self.workdir / f"coordinator-{self.port}.log").read_text(errors="replace")[-3000:]

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, timeout=10, headers=headers)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- the recording proxy


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class TcpRecorder:
    """A TCP relay in front of the coordinator that keeps every byte the client sends.

    With `hold_upload_answers` set, the answer to any upload is kept from the client (the
    server got and counted the update, the device never hears back), to simulate a crash in
    that window."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.streams: list[bytearray] = []  # client -> server bytes, one per connection
        self.hold_upload_answers = False
        self.upload_seen = threading.Event()
        self._release = threading.Event()
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def sent(self) -> bytes:
        return b"".join(bytes(s) for s in self.streams)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()  # upstream down: the client sees a reset, like a dead server
                continue
            stream = bytearray()
            self.streams.append(stream)
            holding = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, stream, holding), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None, holding), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray | None, holding: threading.Event) -> None:
        try:
            while chunk := src.recv(65536):
                if record is not None:
                    record.extend(chunk)
                    if b"/updates HTTP/1.1" in chunk and self.hold_upload_answers:
                        holding.set()
                        self.upload_seen.set()
                elif holding.is_set():
                    self._release.wait()
                    return  # drop the answer: the client never learns the upload was counted
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def requests(self) -> list[Request]:
        """Parse every recorded stream as HTTP/1.1 requests (Content-Length bodies, as httpx sends)."""
        found = []
        for stream in self.streams:
            data, pos = bytes(stream), 0
            while pos < len(data):
                end = data.index(b"\r\n\r\n", pos)
                head = data[pos:end].decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:])}
                assert "transfer-encoding" not in headers, "chunked bodies are not expected from the agent"
                length = int(headers.get("content-length", 0))
                body = data[end + 4 : end + 4 + length]
                assert len(body) == length, "a recorded request was cut short"
                found.append(Request(method, path, headers, body))
                pos = end + 4 + length
        return found

    def close(self) -> None:
        self._closing = True
        self._release.set()
        self.server.close()


# ---------------------------------------------------------------------- data and agents


def make_shards(
    directory: Path, n_devices: int, per_device: int, partition: str = "dirichlet:0.3", seed: int = 0
) -> tuple[list[Path], np.ndarray]:
    """Per-device .npz files of raw uint8 pixels (as a phone holds photos) cut from the embedded
    Fashion-MNIST subset; also returns each device's indices into the embedded train split."""
    from engine.data import load_default, parse_partition

    train = load_default("train")
    parts = parse_partition(partition)(train.labels, n_devices, seed)
    rng = np.random.default_rng(seed)
    paths, chosen = [], []
    for i, part in enumerate(parts):
        idx = np.sort(rng.choice(part, size=min(per_device, len(part)), replace=False))
        x, y = train.raw[idx][:, None], train.labels[idx]
        path = directory / f"device-{i}-private-photos.npz"
        np.savez(path, x=x, y=y.astype(np.int64))
        paths.append(path)
        chosen.append(idx)
    return paths, chosen


def device_token(state_dir: Path) -> str:
    return json.loads((state_dir / "identity.json").read_text())["token"]


def agent_args(coordinator_url: str, data: Path, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "device_agent",
        "run",
        "--coordinator",
        coordinator_url,
        "--data",
        str(data),
        "--state-dir",
        str(state_dir),
        "--enrollment-key",
        ENROLL_KEY,
        "--ignore-conditions",
        "--json",
        "--max-wait",
        "1",
        *extra,
    ]


def start_agent(coordinator_url: str, data: Path, state_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        agent_args(coordinator_url, data, state_dir, *extra),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"agent did not finish in {timeout}s; stderr tail:\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"agent exited {proc.returncode}; stderr tail:\n{err[-3000:]}"
    return out, err


@contextmanager
def recorder(upstream_port: int) -> Iterator[TcpRecorder]:
    proxy = TcpRecorder(upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()


# ---------------------------------------------------------------------- the harness's own tests


def test_recorder_keeps_every_byte_and_parses_requests():
    """Relay to a tiny echo-ish HTTP server and check the recorder saw exactly what was sent."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    payload = bytes(range(256)) * 300
    try:
        with recorder(server.server_address[1]) as proxy, httpx.Client(base_url=proxy.url) as client:
            assert client.post("/a", content=payload).content == payload
            assert client.post("/b", json={"k": 1}).status_code == 200
            reqs = proxy.requests()
            assert [(r.method, r.path) for r in reqs] == [("POST", "/a"), ("POST", "/b")]
            assert reqs[0].body == payload and reqs[1].body == b'{"k":1}'
            assert payload in proxy.sent
    finally:
        server.shutdown()

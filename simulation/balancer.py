"""A round-robin TCP load balancer for loopback runs: the compose file's haproxy (docker/haproxy.cfg),
played by a small asyncio relay so the same topology runs here as plain processes.

    python -m simulation.balancer --port 8000 --upstream 127.0.0.1:8001 --upstream 127.0.0.1:8002

Each new client connection goes to the next upstream in turn; one that refuses the connection (a
replica that died or is restarting) is skipped and left alone for `down_for` seconds, so a client
only notices a dead replica on the connections that were open to it. Balancing is per connection
(haproxy's `mode tcp`), so an HTTP keep-alive connection stays on one replica; device agents that
open new connections, or many devices, spread across all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

LOOPBACK = "127.0.0.1"


def parse_upstream(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise argparse.ArgumentTypeError(f"--upstream {text!r}: expected HOST:PORT")
    return host or LOOPBACK, int(port)


class Balancer:
    """The relay on its own event loop in a background thread (so tests and benches can embed it)."""

    def __init__(self, upstreams: list[tuple[str, int]], port: int = 0, host: str = LOOPBACK, down_for: float = 1.0):
        if not upstreams:
            raise ValueError("a balancer needs at least one upstream")
        self.upstreams, self.host, self.port, self.down_for = list(upstreams), host, port, down_for
        self.counters: Counter[str] = Counter()  # connections per upstream ("127.0.0.1:8001"), refusals
        self._next = 0
        self._down_until: dict[tuple[str, int], float] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pf-balancer", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Balancer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, self.port, reuse_address=True), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> Balancer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _candidates(self) -> list[tuple[str, int]]:
        """Every upstream once, starting with the next in turn; those marked down go last."""
        n = len(self.upstreams)
        order = [self.upstreams[(self._next + i) % n] for i in range(n)]
        self._next = (self._next + 1) % n
        now = time.monotonic()
        return sorted(order, key=lambda u: self._down_until.get(u, 0.0) > now)  # stable: keeps the turn

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        upstream_w = None
        try:
            for upstream in self._candidates():
                try:
                    upstream_r, upstream_w = await asyncio.open_connection(*upstream)
                except OSError:
                    self.counters["refused"] += 1
                    self._down_until[upstream] = time.monotonic() + self.down_for
                    continue
                self.counters[f"{upstream[0]}:{upstream[1]}"] += 1
                await asyncio.gather(self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w))
                return
            self.counters["no_upstream"] += 1
        except asyncio.CancelledError:  # stop(): the connection ends with the balancer
            pass
        finally:
            for writer in (client_w, upstream_w):
                if writer is not None:
                    writer.transport.abort()
            self._tasks.discard(asyncio.current_task())

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Copy until EOF (then half-close the other side) or a reset (then reset it too)."""
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            dst.transport.abort()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m simulation.balancer", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=LOOPBACK)
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed on start)")
    p.add_argument("--upstream", type=parse_upstream, action="append", required=True, help="HOST:PORT, repeatable")
    args = p.parse_args(argv)
    balancer = Balancer(args.upstream, port=args.port, host=args.host).start()
    print(json.dumps({"url": balancer.url, "upstreams": len(args.upstream)}), flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    balancer.stop()
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps({"counters": dict(balancer.counters)}), flush=True)
    sys.exit(0)


class BalancerProcess:
    """`python -m simulation.balancer` as a child process (its own CPU and GIL, apart from the load it
    relays): start() returns once it listens; stop() returns its counters."""

    def __init__(self, upstreams: list[tuple[str, int]]):
        self.upstreams = upstreams
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> BalancerProcess:
        args = [sys.executable, "-m", "simulation.balancer"]
        for host, port in self.upstreams:
            args += ["--upstream", f"{host}:{port}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the balancer exited with {self.proc.wait()}")
        self.url = json.loads(line)["url"]
        return self

    def stop(self) -> dict[str, int]:
        if self.proc is None or self.proc.poll() is not None:
            return {}
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        return lines[-1]["counters"] if lines else {}


if __name__ == "__main__":
    main()

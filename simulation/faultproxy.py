"""A fault-injecting TCP proxy for loopback chaos runs: agents -> proxy -> coordinator.

With seeded randomness it
- **refuses** a connection (accepts it and resets it at once, before any byte is relayed);
- **delays** a request or response (sleeps before relaying the bytes that complete its head);
- **cuts** a request or a response **mid-body**: relays a random prefix of the body, then resets
  both sides (an upload the coordinator never got whole; an answer the device never read);
and counts what it did. It also records, as an independent witness for the audit, every upload
it relayed whole (body saved under its sha256) and every answer the coordinator gave to one:

    <record_dir>/uploads.jsonl   {"event": "forwarded"|"answered", "key", "round_id", "token_sha256",
                                  "sha256", "size", "status"?, "delivered"?, "t"}
    <record_dir>/bodies/<sha256>.bin

    proxy = FaultProxy(upstream_port=8000, faults=Faults(seed=1, refuse=0.05, cut_request=0.1))
    proxy.start(); ...; proxy.stop(); print(proxy.counters)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from engine.serialize.container import write_atomic
from simulation.httpwire import HttpStream, Message

LOOPBACK = "127.0.0.1"


@dataclass
class Faults:
    """Probabilities per connection (refuse) or per message (delay, cuts); all off by default."""

    seed: int = 0
    refuse: float = 0.0
    delay: float = 0.0
    max_delay: float = 0.3  # seconds, uniform in [0, max_delay]
    cut_request: float = 0.0  # only requests with a body
    cut_response: float = 0.0  # only responses with a body
    cut_ack: float = 0.0  # answers to uploads, on top of cut_response (the device never hears it counted)

    def __post_init__(self) -> None:
        for name in ("refuse", "delay", "cut_request", "cut_response", "cut_ack"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Faults.{name} must be a probability in [0, 1], got {value}")
        if self.max_delay < 0:
            raise ValueError(f"Faults.max_delay must be >= 0 seconds, got {self.max_delay}")


class UploadRecorder:
    """Append-only log of uploads relayed whole and of the coordinator's answers to them."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        (self.dir / "bodies").mkdir(parents=True, exist_ok=True)
        self._log = open(self.dir / "uploads.jsonl", "a")  # noqa: SIM115 (closed in close())

    def _write(self, event: dict) -> None:
        self._log.write(json.dumps({**event, "t": time.time()}) + "\n")
        self._log.flush()

    @staticmethod
    def _who(request: Message) -> dict:
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return {
            "key": request.headers.get("idempotency-key"),
            "round_id": request.upload_round,
            "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
        }

    def forwarded(self, request: Message) -> None:
        body = bytes(request.body or b"")
        digest = hashlib.sha256(body).hexdigest()
        path = self.dir / "bodies" / f"{digest}.bin"
        if not path.exists():
            write_atomic(path, body)
        self._write({"event": "forwarded", **self._who(request), "sha256": digest, "size": len(body)})
        request.recorded_sha256 = digest

    def answered(self, response: Message, delivered: bool) -> None:
        request = response.request
        self._write(
            {
                "event": "answered",
                **self._who(request),
                "status": response.status,
                "sha256": request.recorded_sha256,
                "delivered": delivered,
            }
        )

    def close(self) -> None:
        self._log.close()


class FaultProxy:
    """The proxy, on its own asyncio loop in a background thread (so sync drivers can use it)."""

    def __init__(
        self, upstream_port: int, faults: Faults | None = None, record_dir: str | Path | None = None, port: int = 0
    ):
        self.upstream_port, self.faults, self.port = upstream_port, faults or Faults(), port
        self.recorder = UploadRecorder(record_dir) if record_dir is not None else None
        self.counters: Counter[str] = Counter()
        self._rng = random.Random(self.faults.seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pf-fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, LOOPBACK, self.port, reuse_address=True), self._loop
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
        if self.recorder is not None:
            self.recorder.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ one connection

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self.counters["connections"] += 1
        writers, pumps = [client_w], []
        cut = True
        try:
            if self._rng.random() < self.faults.refuse:
                self.counters["refused"] += 1
                return
            try:
                up_r, up_w = await asyncio.open_connection(LOOPBACK, self.upstream_port)
            except OSError:
                self.counters["upstream_unreachable"] += 1
                return
            writers.append(up_w)
            requests: deque[Message] = deque()
            pumps = [
                asyncio.create_task(self._pump(client_r, up_w, HttpStream("request", requests), "up")),
                asyncio.create_task(self._pump(up_r, client_w, HttpStream("response", requests), "down")),
            ]
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop()
            if first.exception() is not None:
                self.counters["proxy_errors"] += 1
            else:
                cut = first.result()
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in writers:
                if cut:
                    writer.transport.abort()  # a reset, as a dying network or process gives
                else:
                    with contextlib.suppress(OSError):
                        writer.close()
            self._tasks.discard(asyncio.current_task())

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, stream: HttpStream, direction: str
    ) -> bool:
        """Relay src -> dst until EOF (returns False) or a deliberate cut (returns True)."""
        f = self.faults
        cut_at: int | None = None
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    return False
                start = stream.offset
                events = [] if stream.opaque else stream.feed(data)
                for event in events:
                    m = event.message
                    if event.kind != "head":
                        continue
                    if f.delay and self._rng.random() < f.delay:
                        self.counters["delayed"] += 1
                        await asyncio.sleep(self._rng.uniform(0, f.max_delay))
                    if cut_at is None and m.body_length > 0 and self._rng.random() < self._p_cut(m, direction):
                        cut_at = m.head_end + self._rng.randrange(m.body_length)
                        self.counters["cut_requests" if direction == "up" else "cut_responses"] += 1
                limit = len(data) if cut_at is None else max(0, min(len(data), cut_at - start))
                if limit:
                    dst.write(data[:limit])
                self.counters["bytes_" + direction] += limit
                # book-keep before draining: the answer to an upload may come back while we wait
                for event in events:
                    if event.kind == "end" and (cut_at is None or event.message.end <= cut_at):
                        self._completed(event.message, direction)
                    elif event.kind == "head" and direction == "down":
                        self._answered(event.message, delivered=cut_at is None or event.message.end <= cut_at)
                await dst.drain()
                if cut_at is not None and start + len(data) >= cut_at:
                    return True
        except (ConnectionError, OSError):
            self.counters["resets_" + direction] += 1
            return True

    def _p_cut(self, message: Message, direction: str) -> float:
        f = self.faults
        if direction == "up":
            return f.cut_request
        is_ack = message.request is not None and message.request.upload_round is not None
        return 1 - (1 - f.cut_response) * (1 - (f.cut_ack if is_ack else 0.0))

    def _completed(self, message: Message, direction: str) -> None:
        self.counters["requests" if direction == "up" else "responses"] += 1
        if direction == "up" and message.upload_round is not None:
            self.counters["uploads_forwarded"] += 1
            if self.recorder is not None:
                self.recorder.forwarded(message)

    def _answered(self, response: Message, delivered: bool) -> None:
        request = response.request
        if request is None or request.upload_round is None:
            return
        if 200 <= response.status < 300:
            self.counters["uploads_acknowledged"] += 1
        if self.recorder is not None and request.recorded_sha256 is not None:
            self.recorder.answered(response, delivered)

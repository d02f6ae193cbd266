"""The scripted coordinator's HTTP layer: a standard-library server on a loopback port that records
every request (with when it arrived and when it was answered) and lets the current scenario answer.

It speaks HTTP/1.1 with keep-alive, like the real coordinator, reads bodies by Content-Length or
chunked encoding (bounded), and can hang up without answering (`DROP`) to play a lost answer.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 64 * 1024 * 1024


@dataclass
class Seen:
    """One request as it arrived, and what it got."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes
    arrived: float  # time.monotonic() when the request line arrived
    wall: float  # time.time() at the same moment
    status: int | None = None  # None: no answer was given (dropped)
    answered: float | None = None  # time.monotonic() once the answer was written
    reply_headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> object:
        return json.loads(self.body or b"null")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: object, headers: dict[str, str] | None = None) -> Reply:
        return cls(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def refuse(cls, status: int, detail: str, headers: dict[str, str] | None = None) -> Reply:
        return cls.json(status, {"detail": detail}, headers)


DROP = Reply(-1)  # hang up without answering: the device cannot know whether the request counted

Handler = Callable[[Seen], Reply]


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        pass  # the scenario keeps its own record

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, size = [], 0
            while True:
                length = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if length == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                size += length
                if size > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(length))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        arrived, wall = time.monotonic(), time.time()
        try:
            body = self._read_body()
        except ValueError:
            self.close_connection = True
            return
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, arrived, wall)
        self.server.record(seen)
        try:
            reply = self.server.handler(seen)
        except Exception as exc:  # a scenario bug must show up as a 500, not a hung device
            reply = Reply.refuse(500, f"scripted coordinator error: {type(exc).__name__}: {exc}")
        if reply is DROP:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(reply.status)
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if reply.body and self.command != "HEAD":
            self.wfile.write(reply.body)
        self.wfile.flush()
        seen.status, seen.reply_headers, seen.answered = reply.status, headers, time.monotonic()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


class ScriptedServer(ThreadingHTTPServer):
    """A loopback HTTP server; `handler` (swappable between scenarios) answers each request."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: Handler | None = None, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _RequestHandler)
        self.handler: Handler = handler or (lambda seen: Reply.refuse(503, "no scenario is running"))
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request: object, client_address: object) -> None:
        """A device killed mid-request resets its connection; that is part of the game, not an error."""

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

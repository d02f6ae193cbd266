"""Just enough HTTP/1.1 framing for the fault proxy to see message boundaries on a byte stream.

The proxy forwards raw TCP; this parser watches the same bytes and reports where each request
or response head ends and where its body ends (absolute offsets in the stream). That is what
lets the proxy cut a connection *mid-body* on purpose, and record which uploads reached the
coordinator whole and what it answered. Bodies are framed by Content-Length, as httpx and
uvicorn send them; anything else (chunked, read-until-close) turns the parser `opaque` and the
proxy just forwards that connection's remaining bytes untouched.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024
UPLOAD_PATH = re.compile(r"^/v1/rounds/(\d+)/updates$")
NO_BODY_STATUS = {204, 304}


@dataclass
class Message:
    """One request or response: its head, where it sits in the stream, and (for uploads) its body."""

    start: int  # stream offset of the first head byte
    head_end: int  # stream offset just past the blank line
    body_length: int
    method: str = ""
    path: str = ""
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    request: Message | None = None  # a response's request
    body: bytearray | None = None  # kept only for uploads
    recorded_sha256: str | None = None  # set by the proxy once an upload was relayed whole

    @property
    def end(self) -> int:
        return self.head_end + self.body_length

    @property
    def upload_round(self) -> int | None:
        """The round id if this is `POST /v1/rounds/{id}/updates`."""
        match = UPLOAD_PATH.match(self.path.split("?", 1)[0]) if self.method == "POST" else None
        return int(match.group(1)) if match else None


@dataclass
class Event:
    kind: str  # "head" (the head is complete) or "end" (the whole message is complete)
    message: Message


class HttpStream:
    """Incremental parser of one direction of one connection.

    `requests` is shared by the two directions of a connection: the request side appends each
    request, the response side pops the one each response answers (HTTP/1.1 answers in order).
    """

    def __init__(self, side: str, requests: deque[Message]):
        if side not in ("request", "response"):
            raise ValueError(f"side must be 'request' or 'response', got {side!r}")
        self.side, self.requests = side, requests
        self.offset = 0  # bytes consumed so far
        self.opaque = False
        self._head = bytearray()
        self._current: Message | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Consume `data`; return the heads and ends completed inside it, in order."""
        events: list[Event] = []
        view, i = memoryview(data), 0
        while i < len(data) and not self.opaque:
            if self._current is None:
                i = self._read_head(view, i, events)
            else:
                m = self._current
                take = min(len(data) - i, m.end - (self.offset + i))
                if m.body is not None:
                    m.body += view[i : i + take]
                i += take
                if self.offset + i >= m.end:
                    self._finish(events)
        self.offset += len(data)
        return events

    def _read_head(self, view: memoryview, i: int, events: list[Event]) -> int:
        start = self.offset + i - len(self._head)
        self._head += view[i:]
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD:
                self.opaque = True
            return len(view)
        consumed_here = end + 4 - (len(self._head) - (len(view) - i))
        head, self._head = bytes(self._head[:end]), bytearray()
        message = self._parse_head(head, start, start + end + 4)
        if message is None:
            self.opaque = True
            return len(view)
        self._current = message
        events.append(Event("head", message))
        if message.body_length == 0:
            self._finish(events)
        return i + consumed_here

    def _parse_head(self, head: bytes, start: int, head_end: int) -> Message | None:
        lines = head.decode("latin-1").split("\r\n")
        try:
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:] if h)}
        except ValueError:
            return None
        if "transfer-encoding" in headers:
            return None  # chunked: not needed for the agent's traffic
        parts = lines[0].split(" ", 2)
        if len(parts) < 2:
            return None
        message = Message(start=start, head_end=head_end, body_length=0, headers=headers)
        if self.side == "request":
            message.method, message.path = parts[0], parts[1]
            self.requests.append(message)
        else:
            if not parts[1].isdigit():
                return None
            message.status = int(parts[1])
            if message.status >= 200:  # 1xx answers come before the real one
                message.request = self.requests.popleft() if self.requests else None
        length = headers.get("content-length")
        no_body = self.side == "response" and (
            message.status in NO_BODY_STATUS
            or message.status < 200
            or (message.request is not None and message.request.method == "HEAD")
        )
        if no_body:
            return message
        if length is None:
            return message if self.side == "request" else None  # a response read until close
        if not length.isdigit():
            return None
        message.body_length = int(length)
        if message.upload_round is not None:
            message.body = bytearray()
        return message

    def _finish(self, events: list[Event]) -> None:
        events.append(Event("end", self._current))
        self._current = None

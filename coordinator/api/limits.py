"""Request body limits as a pure ASGI middleware, so that a stranger's body is refused before any
route, dependency or JSON parser sees it: by Content-Length before a byte is read, by counting
while it streams (413), and by time (408) when it trickles in slower than a minimum rate.

Update uploads, secure-aggregation masked inputs and model files (the binary routes) get
`max_body_bytes`; every other route takes small JSON and gets `max_json_body_bytes`, which keeps JSON
parsing on the event loop cheap.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

BINARY_ROUTES = re.compile(
    r"^/v1/(rounds/\d+/updates|rounds/\d+/secagg/masked_input|admin/models|admin/populations)/?$"
)


async def _within(awaitable, seconds: float):
    """`await awaitable`, or TimeoutError after `seconds` (asyncio.timeout where there is one: it
    costs a timer, where wait_for costs a task per chunk of every body)."""
    if hasattr(asyncio, "timeout"):  # Python >= 3.11
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class BodyRefused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class BodyLimits:
    """Caps every request body by size and by arrival rate (after a grace period)."""

    def __init__(
        self,
        app,
        *,
        max_json_bytes: int,
        max_binary_bytes: int,
        grace_seconds: float,
        min_bytes_per_second: float,
        on_refusal=None,
    ):
        self.app, self.max_json, self.max_binary = app, max_json_bytes, max_binary_bytes
        self.grace, self.min_rate = grace_seconds, min_bytes_per_second
        self.on_refusal = on_refusal or (lambda reason: None)

    def limit_for(self, path: str) -> int:
        return self.max_binary if BINARY_ROUTES.match(path) else self.max_json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(
                send, 413, f"body: Content-Length {int(declared)} exceeds the limit of {limit} bytes"
            )
        state = {"size": 0, "done": False, "refused": None, "started": False}
        started_at = time.monotonic()

        async def limited_receive():
            if state["done"]:
                return await receive()
            budget = self.grace + state["size"] / self.min_rate - (time.monotonic() - started_at)
            try:
                message = await _within(receive(), max(budget, 0.001))
            except asyncio.TimeoutError:
                state["refused"] = BodyRefused(
                    408,
                    f"body: {state['size']} bytes in {time.monotonic() - started_at:.1f} s, slower than "
                    f"the minimum of {self.min_rate:g} bytes/s",
                )
                raise state["refused"] from None
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["size"] > limit:
                    state["refused"] = BodyRefused(413, f"body: more than the limit of {limit} bytes")
                    raise state["refused"]
            else:
                state["done"] = True
            return message

        async def guarded_send(message):
            if state["refused"] is not None and not state["started"]:
                return  # the app's own answer to the exception it saw; ours goes out below
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if state["refused"] is None or state["started"]:
                raise
        if state["refused"] is not None and not state["started"]:
            await self._refuse(send, state["refused"].status, state["refused"].detail)

    async def _refuse(self, send, status: int, detail: str) -> None:
        self.on_refusal("too_large" if status == 413 else "slow_body")
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

"""Reading request bodies within a limit."""

from __future__ import annotations

from fastapi import Request
from starlette.requests import ClientDisconnect

from coordinator.errors import Refused


async def read_limited(request: Request, limit: int) -> bytes:
    """The body, refusing (413) by Content-Length first and again by counting while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length: {declared!r} is not a number", "bad_request")
        if int(declared) > limit:
            raise Refused(413, f"body: Content-Length {declared} exceeds the limit of {limit} bytes", "too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, f"body: more than the limit of {limit} bytes", "too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # the device went away mid-body: nothing was stored, nobody to answer
        raise Refused(400, f"body: the client disconnected after {size} bytes", "disconnected") from None
    if declared is not None and size != int(declared):
        raise Refused(400, f"body: {size} bytes arrived, Content-Length said {declared}", "bad_request")
    return b"".join(chunks)


async def read_body(receive, declared: str | None, limit: int) -> bytes | bytearray:
    """The body from ASGI `receive`, same checks as `read_limited`; with a Content-Length the chunks
    land in one buffer of that size (no list of chunks, no join: one copy less of every upload)."""
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"Content-Length: {declared!r} is not a number", "bad_request")
        if int(declared) > limit:
            raise Refused(413, f"body: Content-Length {declared} exceeds the limit of {limit} bytes", "too_large")
    expected = int(declared) if declared is not None else None
    buffer, chunks, size, more = bytearray(expected or 0), [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":  # the device went away mid-body: nothing stored
            raise Refused(400, f"body: the client disconnected after {size} bytes", "disconnected")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        end = size + len(chunk)
        if end > limit:
            raise Refused(413, f"body: more than the limit of {limit} bytes", "too_large")
        if expected is None:
            chunks.append(chunk)
        elif end <= expected:
            buffer[size:end] = chunk
        size = end
    if expected is None:
        return b"".join(chunks)
    if size != expected:
        raise Refused(400, f"body: {size} bytes arrived, Content-Length said {declared}", "bad_request")
    return buffer

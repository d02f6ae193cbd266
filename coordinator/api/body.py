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

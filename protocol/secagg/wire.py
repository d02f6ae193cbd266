"""What secure-aggregation messages look like on the wire, and the checks every reader applies.

Messages are plain JSON objects (bytes as standard base64 strings); the one large message, the
masked vector, and the persisted session states are *frames*: a short binary prefix, a small JSON
header and a raw body::

    offset 0   8 bytes   magic b"PFSECAGG"
    offset 8   u32       frame version (1)
    offset 12  u32       header length H (<= 16 MiB)
    offset 16  H bytes   UTF-8 JSON object; "kind" names the frame
    offset 16+H          body (for a masked vector: uint32 little-endian, "length" entries)

Readers trust nothing: every problem raises `SecAggError` with a message naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterable
from typing import Any

from protocol.messages import ProtocolError

MAGIC = b"PFSECAGG"
FRAME_VERSION = 1
_PREFIX = struct.Struct("<8sII")
MAX_HEADER_BYTES = 16 * 1024 * 1024


class SecAggError(ProtocolError):
    """A secure-aggregation message or call breaks the protocol; the text says which field and why."""


class RoundAbandoned(Exception):
    """The round cannot finish without risking an individual input or a wrong sum; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- frames


def pack_frame(kind: str, header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps({"kind": kind, **header}, separators=(",", ":"), allow_nan=False).encode()
    return _PREFIX.pack(MAGIC, FRAME_VERSION, len(head)) + head + body


def unpack_frame(data: bytes | bytearray | memoryview, kind: str) -> tuple[dict[str, Any], memoryview]:
    """(header, body) of a frame of the expected kind."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise SecAggError(f"{kind}: {len(view)} bytes is too short for a secure-aggregation frame")
    magic, version, head_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise SecAggError(f"{kind}: wrong magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != FRAME_VERSION:
        raise SecAggError(f"{kind}: frame version {version} is not supported (this reader: {FRAME_VERSION})")
    if head_len > MAX_HEADER_BYTES or _PREFIX.size + head_len > len(view):
        raise SecAggError(f"{kind}: header length {head_len} exceeds the data ({len(view)} bytes)")
    try:
        header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + head_len]))
    except (ValueError, RecursionError) as exc:
        raise SecAggError(f"{kind}: header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise SecAggError(f"{kind}: header is not a JSON object")
    if header.get("kind") != kind:
        raise SecAggError(f"expected a {kind!r} frame, got {header.get('kind')!r}")
    return header, view[_PREFIX.size + head_len :]


# ---------------------------------------------------------------- fields


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise SecAggError(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SecAggError(f"{what}: not valid base64") from None
    if size is not None and len(raw) != size:
        raise SecAggError(f"{what}: {len(raw)} bytes, expected {size}")
    return raw


def obj(data: object, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SecAggError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data


def integer(data: dict, name: str, low: int, high: int, what: str) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggError(f"{what}: {name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SecAggError(f"{what}: {name} {value} is outside [{low}, {high}]")
    return value


def listing(data: dict, name: str, what: str) -> list:
    value = data.get(name)
    if not isinstance(value, list):
        raise SecAggError(f"{what}: {name} must be a list, got {type(value).__name__}")
    return value


def envelope(data: object, kind: str, round_id: int, cohort_size: int) -> tuple[dict[str, Any], int]:
    """Check a message's type, round and sender index; return (message, index)."""
    msg = obj(data, kind)
    if msg.get("type") != kind:
        raise SecAggError(f"expected a {kind!r} message, got type {msg.get('type')!r}")
    got_round = msg.get("round_id")
    if got_round != round_id or isinstance(got_round, bool):
        raise SecAggError(f"{kind}: round_id {got_round!r} is not this round ({round_id})")
    return msg, integer(msg, "index", 1, cohort_size, kind)


def index_list(values: list, what: str, allowed: Iterable[int]) -> list[int]:
    """A list of distinct device indices, every one in `allowed`."""
    allowed = set(allowed)
    out: list[int] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
            raise SecAggError(f"{what}: {value!r} is not one of the expected device indices")
        out.append(value)
    if len(set(out)) != len(out):
        raise SecAggError(f"{what}: a device index appears twice")
    return out

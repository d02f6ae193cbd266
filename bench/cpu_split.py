"""Where a coordinator's CPU goes, from a py-spy raw profile (collapsed stacks): each sample goes to
one bucket, by the first rule that matches its stack, so the buckets add up to the whole.

Whole-stack rules first (a frame anywhere decides: the round commit, the group-commit writer),
then the innermost frame that belongs to a known layer decides, so numpy under the validation
counts as validation and a SQL read under the auth dependency as auth.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# (bucket, any of these in the whole stack)
WHOLE_STACK = [
    ("round commit (once per round)", ("tick (coordinator/service/rounds.py", "commit_round", "_commit (")),
    ("hashing", ("body_digest (", "sha256")),
    ("decoding + validation", ("check_update (", "decode_update (", "prepare_update (")),
    ("accept + running sum", ("accept (coordinator/strategies", "add (coordinator/strategies")),
    ("DB write (group commit)", ("_write (coordinator/service/writer.py",)),
]
# (bucket, any of these in one frame), tried from the innermost frame outwards
BY_FRAME = [
    ("routing + auth + deps", ("coordinator/api/deps.py", "device_for", "token_hash")),
    ("upload route + admission (DB reads)", ("coordinator/api/routers/uploads.py", "coordinator/service/ingest.py")),
    ("DB reads (other)", ("coordinator/store/", "sqlalchemy/", "sqlite3")),
    ("HTTP + ASGI middleware", ("uvicorn/", "h11/", "httptools", "api/limits.py", "api/body.py", "api/fast_upload")),
    ("HTTP + ASGI middleware", ("api/middleware.py", "starlette/middleware", "starlette/requests")),
    ("routing + auth + deps", ("fastapi/", "starlette/routing", "pydantic", "starlette/responses", "starlette/")),
    ("threads + event loop", ("anyio/", "concurrent/futures", "threading.py", "asyncio/", "queue.py", "selectors.py")),
]
IDLE = ("select (selectors", "_worker (concurrent", "wait (threading", "get (queue", "run_forever (")


def bucket(stack: str) -> str | None:
    """The bucket of one sample's stack (frames joined by ";", outermost first); None: idle."""
    frames = stack.split(";")
    if any(idle in frames[-1] for idle in IDLE):
        return None
    for name, marks in WHOLE_STACK:
        if any(mark in stack for mark in marks):
            return name
    for frame in reversed(frames):
        for name, marks in BY_FRAME:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def split(raw: Path) -> dict[str, float]:
    """Fraction of the busy samples in each bucket, largest first."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        name = bucket(stack)
        if name is not None:
            counts[name] += int(n)
    total = sum(counts.values()) or 1
    return {name: n / total for name, n in counts.most_common()}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps({k: round(v, 3) for k, v in split(Path(sys.argv[1])).items()}, indent=1))

"""Where a coordinator's CPU goes, from a py-spy raw profile (collapsed stacks): each sample goes to
one bucket, by the first rule that matches its stack, so the buckets add up to the whole.

    python bench/cpu_split.py PROFILE.raw     # the fractions; bench/load.py --py-spy FILE gives ms

Whole-stack rules first (a frame anywhere decides: the round commit, the group-commit writer),
then the innermost frame that belongs to a known layer decides, so numpy under the validation
counts as validation and a SQL read under the auth dependency as auth.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# (bucket, any of these in the whole stack)
WHOLE_STACK = [
    ("round commit (once per round)", ("tick (coordinator/service/rounds.py", "commit_round")),
    ("hashing (sha256 of the body)", ("body_digest (",)),
    ("decoding + validation", ("check_update (", "decode_update (")),
    ("accept + running sum", ("accept (coordinator/strategies", "add (coordinator/strategies")),
    ("DB write (group commit)", ("_write (coordinator/service/writer.py",)),
    ("auth (token lookup)", ("coordinator/api/deps.py",)),
    ("admission + replay check (DB reads)", ("admit (coordinator/api", "replayed (coordinator/service")),
]
# (bucket, any of these in one frame), tried from the innermost frame outwards
BY_FRAME = [
    ("upload route + other DB reads", ("uploads.py", "coordinator/service/ingest.py", "coordinator/store/")),
    ("thread hop", ("anyio/", "concurrent/futures", "threading.py", "queue.py", "run_in_threadpool")),
    ("HTTP parsing + ASGI middleware", ("uvicorn/", "h11/", "httptools", "api/limits.py", "api/body.py")),
    ("HTTP parsing + ASGI middleware", ("api/fast_upload", "api/middleware.py", "starlette/middleware")),
    ("HTTP parsing + ASGI middleware", ("starlette/requests", "starlette/responses", "fastapi/telemetry")),
    ("HTTP parsing + ASGI middleware", ("fastapi/_body_limit", "fastapi/applications", "starlette/applications")),
    ("routing + dependencies (FastAPI)", ("fastapi/", "starlette/", "pydantic")),
]
LOOP = "_run_module_as_main"  # the root of the main thread's stacks: the event loop
IDLE = ("select (selectors", "_worker (concurrent", "wait (threading", "get (queue", "run_forever (")
OPAQUE = "Runner.run (asyncio/runners.py"  # uvloop's own C code, or waiting in epoll: not told apart


def bucket(stack: str) -> str | None:
    """The bucket of one sample's stack (frames joined by ";", outermost first); None: idle."""
    frames = stack.split(";")
    if any(idle in frames[-1] for idle in IDLE) or frames[-1].startswith(OPAQUE):
        return None
    for name, marks in WHOLE_STACK:
        if any(mark in stack for mark in marks):
            return name
    for frame in reversed(frames):
        for name, marks in BY_FRAME:
            if any(mark in frame for mark in marks):
                return name
    return "other"


def split(raw: Path) -> dict[str, dict[str, float]]:
    """Fractions of the busy samples per bucket, for the event loop's thread ("loop") and for the
    others ("threads"), each summing to 1: scaled by each side's CPU time (from /proc) they give
    milliseconds. Samples sitting in uvloop's C code are left out (uvloop's C work is then spread
    over the loop's buckets in proportion)."""
    counts: dict[str, Counter[str]] = {"loop": Counter(), "threads": Counter()}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        name = bucket(stack)
        if name is not None:
            counts["loop" if stack.startswith(LOOP) else "threads"][name] += int(n)
    return {side: {name: n / (sum(c.values()) or 1) for name, n in c.most_common()} for side, c in counts.items()}


def split_ms(raw: Path, loop_ms: float, threads_ms: float) -> dict[str, float]:
    """Milliseconds per bucket: the loop's and the other threads' CPU split by their samples."""
    fractions, total = split(raw), Counter()
    for side, ms in (("loop", loop_ms), ("threads", threads_ms)):
        for name, fraction in fractions[side].items():
            total[name] += fraction * ms
    return {name: round(ms, 2) for name, ms in total.most_common()}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(split(Path(sys.argv[1])), indent=1))

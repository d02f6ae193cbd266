"""Refusals: every 4xx the coordinator answers carries {"detail": "<which field and why>"}.

`Refused` is raised by services as well as routers, so it is a plain exception, not FastAPI's:
coordinator/api/errors.py turns it into the HTTP answer.
"""

from __future__ import annotations

import os


class Refused(Exception):
    """A request refused: its HTTP status, what was wrong (`detail`) and a short machine-readable
    `reason` (the /metrics label)."""

    def __init__(self, status_code: int, detail: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code, self.detail, self.reason, self.headers = status_code, detail, reason, headers


def crash_point(name: str) -> None:
    """Test hook: die like kill -9 at the named point when PF_TEST_CRASH_POINT says so."""
    if os.environ.get("PF_TEST_CRASH_POINT") == name:
        os._exit(137)

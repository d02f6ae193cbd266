"""Refusals: every 4xx the coordinator answers carries {"detail": "<which field and why>"}."""

from __future__ import annotations

import os

from fastapi import HTTPException


class Refused(HTTPException):
    """An HTTPException with a short machine-readable `reason` (the /metrics label)."""

    def __init__(self, status_code: int, detail: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.reason = reason


def crash_point(name: str) -> None:
    """Test hook: die like kill -9 at the named point when PF_TEST_CRASH_POINT says so."""
    if os.environ.get("PF_TEST_CRASH_POINT") == name:
        os._exit(137)

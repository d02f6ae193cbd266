"""A dependency-free progress bar (stderr), so phones need no tqdm."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, enabled: bool = True, width: int = 28
    ) -> None:
        self.total, self.label, self.width = max(int(total), 1), label, width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.count, self.start, self._last = 0, time.perf_counter(), 0.0
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.count >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.count / self.total, 1.0)
        filled = int(frac * self.width)
        rate = self.count / max(now - self.start, 1e-9)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {self.count}/{self.total} {rate:.1f}/s {self.postfix}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self.count < self.total or self._last == 0.0:  # the last update already drew the full bar
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

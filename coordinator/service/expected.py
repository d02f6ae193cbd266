"""Uploads on their way to the group-commit writer (service/writer.py), which a group may wait for."""

from __future__ import annotations

import threading


class Arrivals:
    """How many uploads are on their way: counted from `expect()` until their `Expected.done()`."""

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()

    def expect(self) -> Expected:
        with self.lock:
            self.count += 1
        return Expected(self)


class Expected:
    """An upload the writer may wait for (`Arrivals.expect`); `done()` may be called twice."""

    def __init__(self, arrivals: Arrivals):
        self._arrivals, self._open = arrivals, True

    def done(self) -> None:
        with self._arrivals.lock:
            if self._open:
                self._open = False
                self._arrivals.count -= 1

"""Background ticking: a thread that settles rounds (deadlines; goals reached) every tick_interval
seconds, and at once when a request notices a passed deadline (`wake`). No GET handler settles
anything; tests with a fake clock call `tick()` to settle synchronously."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("pocketfed.coordinator")


class Ticker:
    def __init__(self, tick: Callable[[], None], interval: float):
        self._tick, self.interval = tick, interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._wake.clear()
            self._thread = threading.Thread(target=self._run, name="pf-ticker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        """Tick now rather than at the next interval."""
        self._wake.set()

    def tick(self) -> None:
        """One settling pass, on the calling thread."""
        self._tick()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._tick()
            except Exception:  # keep ticking: the next pass retries
                log.exception("settling rounds failed")

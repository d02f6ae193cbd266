"""The device worker pool: N `python -m simulation.worker` processes playing devices one at a time.

`play(devices)` hands each device to whichever worker is free and returns the answers in completion
order. Any worker may be SIGKILLed mid-task (`kill`, used by chaos runs): a fresh process replaces
it and its device goes back to the front of the queue, so the device "restarts the app" and resumes
from its state directory (an unacknowledged upload is re-sent with the same Idempotency-Key).
Answers from a killed process's generation are ignored. Between answers, `play` calls `tick()`
every few milliseconds when given one: that is where a chaos hook decides to kill.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from simulation.processes import SimulationError, child_env, peak_rss_mib, stop_process, tail

Message = tuple[int, int, dict | None]  # (worker index, its generation, a JSON line or None at EOF)


class WorkerPool:
    def __init__(self, size: int, worker_config_json: str, log_dir: Path, ready_timeout: float = 300.0):
        self.config_json, self.log_dir = worker_config_json, log_dir
        self.procs: list[subprocess.Popen | None] = [None] * size
        self.generation = [0] * size
        self.ready: set[int] = set()
        self.busy: dict[int, tuple[int, float]] = {}  # worker -> (device, monotonic start)
        self.kills = 0
        self._todo: deque[int] = deque()
        self._messages: queue.Queue[Message] = queue.Queue()
        self._logs: list[TextIO] = []
        for index in range(size):
            self._spawn(index)
        deadline = time.monotonic() + ready_timeout
        while len(self.ready) < size:  # every worker has loaded its data and partition
            self._handle(self._get(deadline - time.monotonic()))

    def _spawn(self, index: int) -> None:
        self.generation[index] += 1
        log = open(self.log_dir / f"worker-{index}.log", "a")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulation.worker", self.config_json],
            cwd=self.log_dir,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.procs[index] = proc
        generation = self.generation[index]

        def read() -> None:
            for line in proc.stdout:
                self._messages.put((index, generation, json.loads(line)))
            self._messages.put((index, generation, None))

        threading.Thread(target=read, daemon=True).start()

    def _get(self, timeout: float) -> Message:
        try:
            return self._messages.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise SimulationError(f"no answer from any device worker within {timeout:.0f}s") from None

    def _handle(self, message: Message) -> dict | None:
        """Book-keep one message from a worker; returns a device's answer, if it was one."""
        index, generation, answer = message
        if generation != self.generation[index]:
            return None  # the last words of a process we killed
        if answer is None:
            raise SimulationError(
                f"device worker {index} exited with {self.procs[index].wait()}:\n"
                f"{tail(self.log_dir / f'worker-{index}.log')}"
            )
        if answer.get("ready"):
            self.ready.add(index)
            return None
        self.busy.pop(index, None)
        return answer

    def kill(self, index: int) -> int:
        """SIGKILL worker `index` now; its device is queued again and a new worker started. Returns the
        device it was playing."""
        device, _ = self.busy.pop(index)
        proc = self.procs[index]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.kills += 1
        self.ready.discard(index)
        self._todo.appendleft(device)
        self._spawn(index)
        return device

    def play(
        self,
        devices: Iterable[int],
        on_answer: Callable[[dict], None] | None = None,
        on_start: Callable[[int], None] | None = None,
        tick: Callable[[], None] | None = None,
        timeout: float = 900.0,
        extra: dict[int, dict] | None = None,
        job: Callable[[int], dict] | None = None,
    ) -> list[dict]:
        """Run each device until it answers (killed devices run again); answers in completion order.

        `on_start(device)` runs just before a device's task is sent, `tick()` between messages; `extra[device]`
        goes into that device's job (e.g. {"leave_after": "masked_input"}), and so does `job(device)`
        (worker.py: mode, dropout, version)."""
        poll = 0.005 if tick is not None else 0.5  # without a tick there is nothing to do between messages
        self._todo.extend(devices)
        answers: list[dict] = []
        last_progress = time.monotonic()
        while self._todo or self.busy:
            for index in sorted(self.ready - set(self.busy)):
                if not self._todo:
                    break
                device = self._todo.popleft()
                if on_start is not None:
                    on_start(device)
                self.busy[index] = (device, time.monotonic())
                message = {"device": int(device), **(extra or {}).get(device, {})}
                message.update(job(device) if job is not None else {})
                self.procs[index].stdin.write(json.dumps(message) + "\n")
                self.procs[index].stdin.flush()
            try:
                answer = self._handle(self._messages.get(timeout=poll))
            except queue.Empty:
                answer = None
            if answer is not None:
                last_progress = time.monotonic()
                answers.append(answer)
                if on_answer is not None:
                    on_answer(answer)
            elif time.monotonic() - last_progress > timeout:
                raise SimulationError(f"no device finished within {timeout:.0f}s")
            if tick is not None:
                tick()
        return answers

    def peak_rss_mib(self) -> list[float | None]:
        return [peak_rss_mib(p.pid) if p is not None and p.poll() is None else None for p in self.procs]

    def stop(self) -> None:
        """Ask each live worker to finish (an empty line), then wait, then kill the ones that don't."""
        for proc in self.procs:
            try:
                if proc is not None and proc.poll() is None:
                    proc.stdin.write("\n")
                    proc.stdin.close()
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                stop_process(proc, grace=5)
        for log in self._logs:
            log.close()

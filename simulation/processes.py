"""The simulation's processes: one real coordinator (`python -m coordinator`) and a pool of
device workers (`python -m simulation.worker`), all started in their own session
so a Ctrl-C reaches only pf-sim, which then stops them in order."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import httpx

import coordinator

PROJECT_ROOT = Path(coordinator.__file__).resolve().parents[1]


class SimulationError(RuntimeError):
    """A process of the simulation failed; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Several busy processes on few cores: a BLAS thread pool per process only fights over the cores
# (measured: LeNet training 3-5x slower with OpenBLAS's default threads on 2 cores).
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def child_env() -> dict[str, str]:
    """Our environment, with the project importable even when it is not pip-installed, single-threaded
    BLAS unless the caller chose otherwise."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **SINGLE_THREADED,
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), path) if p),
        "PYTHONUNBUFFERED": "1",
    }


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, from /proc; None where there is no /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class CoordinatorProcess:
    """`python -m coordinator --host 127.0.0.1 --port P ...options` with its log in `workdir`."""

    def __init__(self, workdir: Path, options: dict[str, Any], port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir, self.options = workdir, options
        self.log_path = workdir / "coordinator.log"
        self.proc: subprocess.Popen | None = None
        self._log: TextIO | None = None

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(self.port)]
        for key, value in self.options.items():
            if value is not None:
                args += ["--" + key.replace("_", "-"), str(value)]
        return args

    def start(self, timeout: float = 60.0) -> CoordinatorProcess:
        self._log = open(self.log_path, "a")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=child_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SimulationError(f"the coordinator exited with {self.proc.returncode}:\n{tail(self.log_path)}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SimulationError(f"the coordinator did not answer /healthz within {timeout:.0f}s:\n{tail(self.log_path)}")

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.proc.pid) if self.proc and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


class WorkerPool:
    """N worker processes; `play(devices)` hands devices out one at a time to whichever worker is free."""

    def __init__(self, size: int, worker_config_json: str, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self._logs: list[TextIO] = []
        self._answers: queue.Queue[tuple[int, dict | None]] = queue.Queue()
        for i in range(size):
            log = open(log_dir / f"worker-{i}.log", "a")  # noqa: SIM115 (closed in stop)
            proc = subprocess.Popen(
                [sys.executable, "-m", "simulation.worker", worker_config_json],
                cwd=log_dir,
                env=child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
                start_new_session=True,
            )
            self.procs.append(proc)
            self._logs.append(log)
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()
        for _ in range(size):  # every worker has loaded its data and partition
            self._next_answer(timeout=300)

    def _read(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._answers.put((index, json.loads(line)))
        self._answers.put((index, None))  # EOF: the worker is gone

    def _next_answer(self, timeout: float) -> tuple[int, dict]:
        try:
            index, answer = self._answers.get(timeout=timeout)
        except queue.Empty:
            raise SimulationError(f"no answer from any device worker within {timeout:.0f}s") from None
        if answer is None:
            raise SimulationError(
                f"device worker {index} exited with {self.procs[index].wait()}:\n"
                f"{tail(self.log_dir / f'worker-{index}.log')}"
            )
        return index, answer

    def play(
        self, devices: Iterable[int], on_answer: Callable[[dict], None] | None = None, timeout: float = 900.0
    ) -> list[dict]:
        """Run each device once; answers come back in completion order."""
        todo, answers = list(devices), []
        busy = 0
        for worker in range(len(self.procs)):
            if todo:
                self._send(worker, todo.pop(0))
                busy += 1
        while busy:
            worker, answer = self._next_answer(timeout)
            busy -= 1
            answers.append(answer)
            if on_answer is not None:
                on_answer(answer)
            if todo:
                self._send(worker, todo.pop(0))
                busy += 1
        return answers

    def _send(self, worker: int, device: int) -> None:
        self.procs[worker].stdin.write(json.dumps({"device": int(device)}) + "\n")
        self.procs[worker].stdin.flush()

    def peak_rss_mib(self) -> list[float | None]:
        return [peak_rss_mib(p.pid) if p.poll() is None else None for p in self.procs]

    def stop(self) -> None:
        stop_workers(self.procs, self._logs)


def stop_workers(procs: list, logs: list) -> None:
    """Ask each live worker to finish (an empty line), then wait, then kill the ones that don't."""
    for proc in procs:
        try:
            if proc is not None and proc.poll() is None:
                proc.stdin.write("\n")
                proc.stdin.close()
        except (OSError, ValueError):
            pass
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            stop_process(proc, grace=5)
    for log in logs:
        log.close()

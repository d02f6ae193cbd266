"""The simulation's child processes: one real coordinator (`python -m coordinator`) here, the device
workers in pool.py. Each starts in its own session so a Ctrl-C reaches only pf-sim, which then
stops them in order."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the packages, for the children


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
                args.append(f"--{key.replace('_', '-')}={value}")  # "=": a value may start with "-" (a random token)
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

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        return tail(self.log_path)

    def peak_rss_mib(self) -> float | None:
        return peak_rss_mib(self.proc.pid) if self.running else None

    def crash_and_restart(self) -> None:
        """SIGKILL (no shutdown code runs, as in a power cut), then the same command on the same
        database and port."""
        self.proc.kill()
        self.proc.wait()
        self.stop()  # closes the log handle; the process is already gone
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

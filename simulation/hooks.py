"""Plug-in points on the one run loop of `Simulation`; chaos (simulation/chaos.py) is made of hooks.

A run without hooks is the plain simulation. Each hook overrides only what it needs; the loop calls
them in this order:

    coordinator_options()      extra coordinator settings (before it starts)
    start(sim)                 the coordinator is up, the workers are not yet (e.g. start a proxy)
    agent_url(url)             where devices send their requests (e.g. through that proxy)
    worker_options()           extra WorkerConfig fields for the device workers
      task_started(device)     just before a device's task goes to a worker     } during
      tick()                   between device answers and while a round commits  } each round
      add_to_record(r, detail) extra fields for the round's JSON line (detail: GET /v1/rounds/{id})
    summarize(summary)         extra summary fields while every process still runs
    stop()                     always, once the coordinator and workers are stopped (also on errors)
    after_stop(summary)        summary fields that need everything at rest (e.g. the audit)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulation.simulation import Simulation


class SimulationHook:
    def coordinator_options(self) -> dict[str, Any]:
        return {}

    def start(self, sim: Simulation) -> None:
        pass

    def agent_url(self, url: str) -> str:
        return url

    def worker_options(self) -> dict[str, Any]:
        return {}

    def task_started(self, device: int) -> None:
        pass

    def tick(self) -> None:
        pass

    def add_to_record(self, record: dict, detail: dict) -> None:
        pass

    def summarize(self, summary: dict) -> None:
        pass

    def stop(self) -> None:
        pass

    def after_stop(self, summary: dict) -> None:
        pass

"""Federated evaluation and personalization: tasks that train nothing global, and the metrics they bring.

A device that declared the kinds at check-in and has nothing to train is offered, in this order,
an "evaluate" task for a version someone asked the fleet to measure (`request_evaluation`, e.g. a
release candidate), or a "personalize" task for the current base version it has not reported yet:
it adopts that version, fine-tunes its personal layers and reports global and personal accuracy
on its held-out data. Older agents never declare the kinds, so they never see such a task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from coordinator.errors import Refused
from coordinator.settings import Settings
from coordinator.store import Store
from coordinator.store import fedmetrics as table
from coordinator.store.fedmetrics import VersionMetrics
from protocol.messages import FederatedMetrics, Task

EVALUATE_KEY = "federated_evaluation_versions"  # server_state: versions the fleet is asked to evaluate


class FederatedMetricsService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        base_version: Callable[[], int],
        exists: Callable[[int], bool],
        clock: Callable[[], float] = time.time,
    ):
        self.settings, self.store, self.clock = settings, store, clock
        self.base_version, self.exists = base_version, exists  # the version devices should adopt

    # ------------------------------------------------------------------ what to ask

    def evaluation_requests(self) -> list[int]:
        raw = self.store.state(EVALUATE_KEY)
        return [int(v) for v in raw.decode().split(",") if v] if raw else []

    def request_evaluation(self, versions: Iterable[int]) -> None:
        """Ask devices to evaluate these versions (without adopting them); replaces the earlier list."""
        wanted = ",".join(str(int(v)) for v in versions)
        with self.store.transaction() as tx:
            tx.set_state(EVALUATE_KEY, wanted.encode())

    def task_for(self, device_id: str, kinds: Iterable[str]) -> Task | None:
        """An evaluate or personalize task for this device, or None (nothing it lacks, or kinds unsupported)."""
        kinds = set(kinds)
        if "evaluate" in kinds:
            for version in self.evaluation_requests():
                if not table.has_reported(self.store, device_id, version, "evaluate"):
                    return self._task("evaluate", version)
        if "personalize" in kinds and self.settings.personalize_tasks:
            version = self.base_version()
            if not table.has_reported(self.store, device_id, version, "personalize"):
                return self._task("personalize", version)
        return None

    def _task(self, kind: str, version: int) -> Task:
        s = self.settings
        return Task(
            round_id=0,  # no round: nothing is aggregated
            base_version=version,
            epochs=s.personal_epochs,
            batch_size=s.batch_size,
            lr=s.lr,
            momentum=s.momentum,
            deadline=self.clock() + s.metrics_task_seconds,
            kind=kind,
        )

    # ------------------------------------------------------------------ what came back

    def report(self, device_id: str, metrics: FederatedMetrics) -> None:
        if not self.exists(metrics.version):
            raise Refused(404, f"model version {metrics.version} does not exist", "unknown_model")
        row = metrics.to_dict()
        table.record(self.store, device_id, row, self.clock())

    def per_version(self, limit: int | None = None, since: int | None = None) -> dict[int, VersionMetrics]:
        """By version: the newest `limit` reported, or those from version `since` on (a listing's range)."""
        return {m.version: m for m in table.per_version(self.store, limit, since)}

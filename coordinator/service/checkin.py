"""Check-in, the device protocol's first step: a task (the same one again for a device already
assigned), or when to come back (pace steering).

It looks without the lock (committed state); a new assignment goes through the upload writer,
grouped with others, which checks the round's room again. A check-in also keeps the device's
`last_seen`, to the minute: most check-ins write nothing, and the write that is due rides in the
writer's next group before the device is answered.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from coordinator.service.privacy import PrivacyLedger
from coordinator.service.rounds import RoundLifecycle
from coordinator.service.writer import Assignment, Seen, UploadWriter
from coordinator.settings import Settings
from coordinator.store import DeviceRow, RoundRow, Store
from protocol.messages import CheckinAnswer, Task

LAST_SEEN_RESOLUTION = 60.0  # seconds: last_seen is rewritten at most this often per device


def wait(store: Store, future: Future) -> Any:
    if store.lock.held():  # the writer needs this lock: waiting here would never end
        raise RuntimeError("waiting for the upload writer while holding the store's lock")
    return future.result()


class CheckIn:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        lifecycle: RoundLifecycle,
        privacy: PrivacyLedger,
        writer: UploadWriter,
        clock: Callable[[], float] = time.time,
        on_late: Callable[[], None] | None = None,
        metrics_task: Callable[[str, frozenset[str]], Task | None] | None = None,
    ):
        self.settings, self.store, self.lifecycle, self.privacy = settings, store, lifecycle, privacy
        # an evaluate or personalize task for a device with nothing to train (service/fedmetrics.py)
        self.metrics_task = metrics_task
        self.writer, self.clock = writer, clock
        self.on_late = on_late or (lambda: None)  # wakes the background tick when a deadline has passed
        self._tasks: dict[int, Task] = {}
        self._recent: deque[float] = deque(maxlen=100_000)  # check-in times on this replica (the dashboard)

    def per_minute(self) -> int:
        """Check-ins this replica answered in the last 60 seconds (capped at the deque's length)."""
        since, count = self.clock() - 60.0, 0
        for t in reversed(self._recent):  # newest first: stop at the first older one
            if t < since:
                break
            count += 1
        return count

    def task_for(self, r: RoundRow) -> Task:
        """The round's task (built once per round: every device of the round gets the same)."""
        task = self._tasks.get(r.id)
        if task is None:
            cfg = r.config
            task = Task(
                round_id=r.id,
                base_version=r.base_version,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                momentum=cfg.momentum,
                deadline=r.deadline,
                **self.lifecycle.strategy_for(r).task_options(),
                clip_norm=cfg.clip_norm,
                noise_multiplier=cfg.noise_multiplier,
                encoding=cfg.encoding,
                topk_fraction=cfg.topk_fraction,
                secure_aggregation=cfg.secure_aggregation,
            )
            if len(self._tasks) >= 4:
                self._tasks.pop(min(self._tasks))
            self._tasks[r.id] = task
        return task

    def _retry(self, seconds: float, reason: str) -> CheckinAnswer:
        s = self.settings
        wait_s = int(math.ceil(min(max(seconds, s.min_retry_after), s.max_retry_after)))
        return CheckinAnswer("retry", retry_after=wait_s, reason=reason)

    def checkin(self, device: DeviceRow, eligible: bool, task_kinds: frozenset[str] = frozenset()) -> CheckinAnswer:
        """`task_kinds`: what the device declared it can do besides training (older agents: nothing)."""
        now = self.clock()
        self._recent.append(now)
        due = device.last_seen is None or now - device.last_seen >= LAST_SEEN_RESOLUTION
        answer, written = self._answer(device.id, eligible, now, due)
        if due and not written:
            wait(self.store, self.writer.submit(Seen(device.id, now)))
        if answer.status == "retry" and eligible and task_kinds and self.metrics_task is not None:
            task = self.metrics_task(device.id, task_kinds)  # nothing to train: measure or personalize instead
            if task is not None:
                return CheckinAnswer("task", task=task)
        return answer

    def _answer(self, device_id: str, eligible: bool, now: float, due: bool) -> tuple[CheckinAnswer, bool]:
        """(the answer, whether last_seen was written along with an assignment)."""
        written = False
        for _ in range(2):  # twice: the round may close between the look and the assignment
            r = self.lifecycle.current()
            paused = self.lifecycle.paused
            if paused or r is None:
                if not paused:  # why none is open: the budget (looked at here too on replicas that do not tick)
                    self.privacy.budget_allows(self.lifecycle.round_settings)
                note = self.privacy.budget_note or ("training is paused" if paused else "no round is open yet")
                return self._retry(self.settings.max_retry_after / 4, note), written
            if now >= r.deadline:  # the background tick has not closed it yet
                self.on_late()
                return self._retry(0, f"round {r.id} passed its deadline; check in again"), written
            to_deadline = r.deadline - now
            if not eligible:
                return self._retry(to_deadline, "device reported not eligible"), written
            if not self.lifecycle.releases.admits(bool(r.canary), device_id):
                why = f"round {r.id} is the canary of candidate v{r.base_version}, for canary devices only"
                return self._retry(to_deadline, why), written
            if self.store.has_update(r.id, device_id):
                return self._retry(to_deadline, f"already contributed to round {r.id}"), written
            if self.store.is_assigned(r.id, device_id):
                return CheckinAnswer("task", task=self.task_for(r)), written
            if r.dp_q is not None and r.config.dp_sampling == "poisson" and not self.privacy.admitted(r, device_id):
                why = f"not sampled for round {r.id} (each device is admitted with probability {r.dp_q:.3g})"
                return self._retry(to_deadline, why), written
            outcome = "full"
            if self.store.count_assigned(r.id) < r.max_assignments:
                assignment = Assignment(device_id, r.id, seen_at=now if due and not written else None)
                outcome = wait(self.store, self.writer.submit(assignment))
                written = written or due
            if outcome == "assigned":
                return CheckinAnswer("task", task=self.task_for(r)), written
            if outcome == "full":
                return self._retry(to_deadline, f"round {r.id} has all {r.max_assignments} devices it needs"), written
        return self._retry(0, "the round just closed; check in again"), written

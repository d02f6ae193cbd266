"""The tasks that train nothing global (issue 17): evaluate and personalize, and the scheduled refresh
of the base model for a device the coordinator did not pick for training.

- personalize V: adopt version V as the base (download unless cached), fine-tune the personal layers
  on it (unless they already are on V), report global and personal accuracy on the held-out data;
- evaluate V: measure V as served and with our personal layers on it, adopting nothing (the cached
  base and the personal layers stay as they are), and report;
- refresh: on its own schedule, a device asks GET /v1/models/latest with If-None-Match (a 304 costs
  a few hundred bytes) and re-personalizes locally on a newer version, so `pf-agent predict` serves a
  personal model on the freshest base even from a coordinator that never sends personalize tasks.

Only accuracies, losses and the held-out count leave the device (protocol.messages.FederatedMetrics).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from device_agent.client import CoordinatorError, RejectedError
from device_agent.models import CorruptModel, model_problem
from protocol.messages import FederatedMetrics, Task

if TYPE_CHECKING:
    from device_agent.runner import Agent

log = logging.getLogger("pocketfed.agent.tasks")

TASK_KINDS = ["train", "evaluate", "personalize"]  # what this agent declares at check-in


def personalize_on(agent: Agent, version: int, data: bytes, epochs: int | None = None) -> dict[str, Any]:
    """Fine-tune the personal layers on `version` unless they already are; then measure both models."""
    if agent.personal.base_version() == version:
        return agent.personal.measure(data, version, agent.eval_set)
    return agent.personal.update(data, version, agent.train_set, agent.eval_set, epochs)


def verified_download(agent: Agent, version: int) -> bytes:
    """`version`'s bytes, verified, without touching the cache (an evaluated version is not adopted)."""
    cached = agent.state.cached_model()
    if cached is not None and cached[0] == version:
        return cached[2]
    problem = "not downloaded"
    for _ in range(2):
        data, etag = agent.client.download_model(version)
        problem = model_problem(data or b"", etag)
        if problem is None:
            return data
    raise CorruptModel(f"model version {version}: {problem}")


def do_metrics_task(agent: Agent, task: Task) -> dict[str, Any] | None:
    """An evaluate or personalize task: its record, or None when it could not be done (logged)."""
    version = task.base_version
    try:
        if task.kind == "personalize":
            data = agent.model_bytes(version)
            measured = personalize_on(agent, version, data, task.epochs)
        else:
            measured = agent.personal.measure(verified_download(agent, version), version, agent.eval_set)
    except (CorruptModel, RejectedError) as exc:
        log.warning("%s task for version %d not done: %s", task.kind, version, exc)
        return None
    if time.time() > task.deadline:
        log.warning("%s task for version %d: the deadline passed; not reporting", task.kind, version)
        return None
    metrics = FederatedMetrics(
        version=version,
        kind=task.kind,
        global_accuracy=measured["global_acc"],
        personal_accuracy=measured["personal_acc"],
        samples=agent.eval_set.size(),
        global_loss=measured["global_loss"],
        personal_loss=measured["personal_loss"],
    )
    try:
        agent.client.report_metrics(metrics)
    except RejectedError as exc:
        log.warning("%s metrics for version %d refused: %s", task.kind, version, exc)
        return None
    return {
        "kind": task.kind,
        "version": version,
        "samples": agent.train_set.size(),
        "eval_samples": agent.eval_set.size(),
        "global_acc": measured["global_acc"],
        "personal_acc": measured["personal_acc"],
        "bytes_sent": 0,
    }


class BaseRefresh:
    """Pick up newer base versions on our own schedule (every `interval` seconds while idle)."""

    def __init__(self, interval: float, clock=time.monotonic):
        self.interval, self.clock = interval, clock
        self.etag: str | None = None
        self.last = clock()  # the first look one interval after start: check-ins may bring a task sooner

    def due(self) -> bool:
        return self.interval > 0 and self.clock() - self.last >= self.interval

    def run(self, agent: Agent) -> dict[str, Any] | None:
        """Re-personalize on the latest version if it is newer than our personal layers' base. Best effort:
        a failure is logged and waits for the next interval (check-ins go on regardless)."""
        self.last = self.clock()
        try:
            info, self.etag = agent.client.latest_model(self.etag)
            if info is None:
                return None  # 304: nothing new
            version = int(info["version"])
        except (CoordinatorError, ValueError, KeyError, TypeError) as exc:
            log.warning("looking for a newer base model failed: %s", exc)
            return None
        mine = agent.personal.base_version()
        if mine is not None and version <= mine:
            return None
        try:
            data = agent.model_bytes(version)
        except (CorruptModel, CoordinatorError) as exc:
            log.warning("refreshing to version %d failed: %s", version, exc)
            return None
        measured = personalize_on(agent, version, data)
        log.info(
            "re-personalized on version %d (personal %s, global %s)",
            version,
            *(measured[k] for k in ("personal_acc", "global_acc")),
        )
        return {"kind": "refresh", "version": version, **{k: measured[k] for k in ("global_acc", "personal_acc")}}

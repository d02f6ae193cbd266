"""The coordinator's services, wired once (`open_services`) and handed to the API as dependencies.

    store (store/) <- versions <- rounds (lifecycle) <- writer <- ingest, checkin, admin
                                         ^ privacy          ticker: rounds.tick in the background

Each service calls only the ones to its left: the lifecycle never calls into the writer, the
writer settles rounds through the lifecycle's `tick` after each group.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.metrics import Metrics, State
from coordinator.service.admin import Admin
from coordinator.service.checkin import CheckIn
from coordinator.service.evaluation import EvaluateFn, Evaluator, engine_evaluator
from coordinator.service.ingest import Ingest
from coordinator.service.modelfile import initial_model_bytes
from coordinator.service.privacy import PrivacyLedger, require_accountant
from coordinator.service.rounds import RoundLifecycle
from coordinator.service.ticker import Ticker
from coordinator.service.versions import ModelVersions
from coordinator.service.writer import UploadWriter
from coordinator.settings import Settings
from coordinator.store import ModelFiles, Store, models_dir_for

log = logging.getLogger("pocketfed.coordinator")


@dataclass
class Services:
    settings: Settings
    store: Store
    files: ModelFiles
    versions: ModelVersions
    privacy: PrivacyLedger
    rounds: RoundLifecycle
    writer: UploadWriter
    ingest: Ingest
    checkin: CheckIn
    admin: Admin
    ticker: Ticker
    metrics: Metrics
    evaluator: Evaluator | None

    def tick(self) -> None:
        """Settle rounds now (what the background ticker does every tick_interval)."""
        self.ticker.tick()

    def close(self) -> None:
        """Stop the background work (ticker, then the writer after what it has queued), then the store."""
        self.ticker.stop()
        self.writer.close()
        if self.evaluator is not None:
            self.evaluator.close()
        self.store.close()

    def state(self) -> State:
        """What /metrics reports besides its own counters, read now."""
        r = self.rounds.current()
        gauges = {
            "pf_current_round": r.id if r else 0,
            "pf_current_round_received": r.received if r else 0,
            "pf_model_version": self.versions.latest(),
            "pf_devices": self.store.count_devices(),
            "pf_paused": int(self.rounds.paused),
        }
        accuracy = self.store.latest_accuracy()
        if accuracy is not None:
            gauges["pf_model_accuracy"] = accuracy
        spent = self.store.last_epsilon()
        if spent is not None:
            gauges["pf_dp_epsilon"], gauges["pf_dp_clip_norm"] = spent
        if self.rounds.round_settings.dp_enabled:
            gauges["pf_dp_budget_exhausted"] = int(self.privacy.budget_note is not None)
        closed = self.store.rounds_by_status()
        counters = {
            "pf_rounds": {(("status", s),): closed.get(s, 0) for s in ("committed", "abandoned")},
            "pf_updates_accepted": {(): self.store.count_updates()},
            "pf_upload_commits": {(): self.writer.groups},
            "pf_upload_commit_updates": {(): self.writer.applied},
        }
        return State(gauges, counters)


def open_services(
    settings: Settings, *, clock: Callable[[], float] = time.time, evaluate: EvaluateFn | None = None
) -> Services:
    """Open the store (migrating it), recover (orphan files, the initial model, the open round) and
    wire the services. `clock` and `evaluate` are injectable for tests."""
    if not settings.enrollment_key:
        settings = settings.model_copy(update={"enrollment_key": secrets.token_urlsafe(16)})
        log.warning("no enrollment key given; generated one for this run: %s", settings.enrollment_key)
    round_settings = settings.round_settings()
    if round_settings.dp_enabled:
        require_accountant()
    store = Store(settings.db)
    files = ModelFiles(models_dir_for(settings.db))
    metrics = Metrics()
    if evaluate is None and settings.eval_data:
        evaluate = engine_evaluator(settings.eval_data)
    evaluator = None
    if evaluate is not None:

        def record(version: int, result: dict) -> None:
            with store.transaction() as tx:
                tx.set_evaluation(version, float(result["accuracy"]), float(result["loss"]), int(result["n"]))

        evaluator = Evaluator(evaluate, record)
    versions = ModelVersions(store, files, on_published=evaluator.submit if evaluator else None)
    privacy = PrivacyLedger(store)
    rounds = RoundLifecycle(round_settings, store, versions, privacy, metrics, clock)
    writer = UploadWriter(store, rounds)
    ticker = Ticker(rounds.tick, settings.tick_interval)
    services = Services(
        settings=settings,
        store=store,
        files=files,
        versions=versions,
        privacy=privacy,
        rounds=rounds,
        writer=writer,
        ingest=Ingest(store, versions, rounds, writer, clock, on_late=ticker.wake),
        checkin=CheckIn(settings, store, rounds, privacy, writer, clock, on_late=ticker.wake),
        admin=Admin(store, versions, rounds),
        ticker=ticker,
        metrics=metrics,
        evaluator=evaluator,
    )
    unevaluated = store.unevaluated_versions()  # left so by a crash; versions published from now on are queued
    rounds.start(lambda: initial_model_bytes(settings.model, settings.model_seed))
    if evaluator is not None:
        for version in unevaluated:
            evaluator.submit(version, versions.get(version).data)
    metrics.watch(services.state)
    return services

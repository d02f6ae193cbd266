"""The coordinator's services, wired once (`open_services`) and handed to the API as dependencies.

    store (store/) <- versions <- rounds (lifecycle) <- writer <- ingest, checkin, admin
                                         ^ privacy          ticker: rounds.tick in the background
                                         ^ aggregates (partials), cluster (shared settings, lease)
                                         ^ releases (candidates, the gate, canaries, pins, the audit)

Named populations (populations.py) are each a whole set of these services on a database of their own.

Each service calls only the ones to its left: the lifecycle never calls into the writer, the
writer settles rounds through the lifecycle's `tick` after each group.

Several processes may run these services on one PostgreSQL database (replicas): nothing another
replica needs is kept only in memory here (service/cluster.py), and the background work -- the
ticker's deadlines and the evaluation of new versions -- runs on the replica holding the lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.metrics import Metrics, State
from coordinator.service.admin import Admin
from coordinator.service.aggregates import replica_name
from coordinator.service.checkin import CheckIn
from coordinator.service.cluster import Lease
from coordinator.service.evaluation import EvaluateFn, Evaluator, engine_evaluator
from coordinator.service.fedmetrics import FederatedMetricsService
from coordinator.service.ingest import Ingest
from coordinator.service.modelfile import initial_model_bytes
from coordinator.service.privacy import PrivacyLedger, require_accountant
from coordinator.service.releases import Releases
from coordinator.service.rounds import RoundLifecycle
from coordinator.service.secagg import SecureAggregation
from coordinator.service.secagg_config import require_cryptography
from coordinator.service.ticker import Ticker
from coordinator.service.training_steps import TrainingSteps
from coordinator.service.versions import ModelVersions
from coordinator.service.writer import UploadWriter
from coordinator.settings import Settings, new_secret
from coordinator.store import BlobStore, Store, blob_store_for

log = logging.getLogger("pocketfed.coordinator")
RATE_LIMIT_KEEP = 3600.0  # seconds of rate-limit windows kept (the limits count per minute)
RATE_LIMIT_PRUNE_EVERY = 60.0  # seconds between the lease holder's deletes of older windows


@dataclass
class Services:
    settings: Settings
    store: Store
    files: BlobStore
    versions: ModelVersions
    training_steps: TrainingSteps
    privacy: PrivacyLedger
    rounds: RoundLifecycle
    writer: UploadWriter
    ingest: Ingest
    checkin: CheckIn
    secagg: SecureAggregation
    admin: Admin
    ticker: Ticker
    metrics: Metrics
    evaluator: Evaluator | None
    lease: Lease
    releases: Releases
    population: str = "default"  # service/populations.py
    enrollment_key_hash: str | None = None  # a named population's key (sha256); default: settings.enrollment_key
    fedmetrics: FederatedMetricsService | None = None  # evaluate/personalize tasks and their metrics
    rate_limits_pruned_at: float = 0.0  # when background() last forgot old rate-limit windows

    def tick(self) -> None:
        """Settle rounds now (what the background ticker does every tick_interval)."""
        self.ticker.tick()

    def background(self) -> None:
        """One pass of the background work, on the replica holding the lease: settle rounds (deadlines),
        open the next, evaluate versions nobody has evaluated yet."""
        if not self.lease.hold():
            return
        self.secagg.tick()
        self.rounds.tick()
        now = self.ingest.clock()  # the clock the rate limits count on (routers/devices.py)
        if now - self.rate_limits_pruned_at >= RATE_LIMIT_PRUNE_EVERY:
            self.store.prune_rate_limits(before=now - RATE_LIMIT_KEEP)
            self.rate_limits_pruned_at = now
        if self.evaluator is not None:
            self.evaluator.catch_up(self.store.unevaluated_versions(), lambda v: self.versions.get(v).data)

    def close(self) -> None:
        """Stop the background work (ticker, then the writer after what it has queued), then the store."""
        self.ticker.stop()
        self.writer.close()
        if self.evaluator is not None:
            self.evaluator.close()
        self.lease.release()
        self.store.close()

    def state(self) -> State:
        """What /metrics reports besides its own counters, read now."""
        r = self.rounds.current()
        gauges = {
            "pf_current_round": r.id if r else 0,
            "pf_current_round_received": r.received if r else 0,
            "pf_model_version": self.versions.latest(),
            "pf_released_version": self.releases.released(),
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
        if self.fedmetrics is not None:
            gauges.update(federated_gauges(self.fedmetrics))
        closed = self.store.rounds_by_status()
        counters = {
            "pf_rounds": {(("status", s),): closed.get(s, 0) for s in ("committed", "abandoned")},
            "pf_updates_accepted": {(): self.store.count_updates()},
            "pf_upload_commits": {(): self.writer.groups},
            "pf_upload_commit_updates": {(): self.writer.applied},
        }
        return State(gauges, counters)


def federated_gauges(fedmetrics: FederatedMetricsService) -> dict[str, float]:
    """The newest version devices reported on: its number, their mean accuracies and the lift."""
    newest = fedmetrics.per_version(limit=1)
    if not newest:
        return {}
    m = next(iter(newest.values()))
    return {
        "pf_federated_version": m.version,
        "pf_federated_devices": m.devices,
        "pf_federated_global_accuracy": m.global_accuracy,
        "pf_federated_personal_accuracy": m.personal_accuracy,
        "pf_personalization_lift": m.lift,
    }


def open_services(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    evaluate: EvaluateFn | None = None,
    initial_model: bytes | None = None,
    population: str = "default",
) -> Services:
    """Open the store (migrating it), recover (orphan files, the initial model, the open round) and
    wire the services. `clock` and `evaluate` are injectable for tests; `initial_model` is a new
    population's first model (else --model)."""
    if not settings.enrollment_key:
        settings = settings.model_copy(update={"enrollment_key": new_secret(16)})
        log.warning("no enrollment key given; generated one for this run: %s", settings.enrollment_key)
    round_settings = settings.round_settings()
    if round_settings.dp_enabled:
        require_accountant()
    if round_settings.secure_aggregation:
        require_cryptography()
    store = Store(settings.db, pool_size=settings.db_pool_size)
    files = blob_store_for(settings.db, store)
    metrics = Metrics()
    if evaluate is None and settings.eval_data:
        evaluate = engine_evaluator(settings.eval_data)
    releases = Releases(
        store,
        tolerance=settings.release_tolerance,
        canary_fraction=settings.canary_fraction,
        server_gate=evaluate is not None,
        clock=clock,
    )
    evaluator = None
    if evaluate is not None:

        def record(version: int, result: dict) -> None:
            with store.transaction() as tx:
                tx.set_evaluation(version, float(result["accuracy"]), float(result["loss"]), int(result["n"]))
            ticker.wake()  # a candidate may await this evaluation before the next round opens

        def failed(version: int, why: str) -> None:
            releases.fail(version, why)
            ticker.wake()

        evaluator = Evaluator(evaluate, record, failed)
    replica = replica_name(store)
    lease = Lease(store, replica, settings.lease_seconds)

    def published(version: int, data: bytes) -> None:
        if evaluator is not None and lease.held:  # else the lease holder finds it unevaluated
            evaluator.submit(version, data)

    versions = ModelVersions(store, files, on_published=published)
    privacy = PrivacyLedger(store)
    rounds = RoundLifecycle(
        round_settings, store, versions, privacy, metrics, clock, replica=replica, releases=releases
    )
    writer = UploadWriter(store, rounds)
    ticker = Ticker(lambda: services.background(), settings.tick_interval)
    fedmetrics = FederatedMetricsService(  # devices personalize on the released version
        settings, store, releases.released, lambda v: store.version(v) is not None, clock
    )
    services = Services(
        settings=settings,
        store=store,
        files=files,
        versions=versions,
        training_steps=TrainingSteps(versions),
        privacy=privacy,
        rounds=rounds,
        writer=writer,
        ingest=Ingest(
            store,
            versions,
            rounds,
            writer,
            clock,
            on_late=ticker.wake,
            max_header_bytes=settings.max_update_header_bytes,
        ),
        checkin=CheckIn(
            settings, store, rounds, privacy, writer, clock, on_late=ticker.wake, metrics_task=fedmetrics.task_for
        ),
        secagg=SecureAggregation(store, versions, rounds, clock),
        admin=Admin(store, versions, rounds),
        ticker=ticker,
        metrics=metrics,
        evaluator=evaluator,
        lease=lease,
        releases=releases,
        population=population,
        fedmetrics=fedmetrics,
    )
    lease.hold()
    rounds.start(lambda: initial_model or initial_model_bytes(settings.model, settings.model_seed))
    if evaluator is not None and lease.held:  # versions a crash left unevaluated
        evaluator.catch_up(store.unevaluated_versions(), lambda v: versions.get(v).data)
    metrics.watch(services.state)
    log.info(
        "population %s: replica %s on %s (%s the background lease)",
        population,
        replica,
        store.label,
        "holds" if lease.held else "waits for",
    )
    return services

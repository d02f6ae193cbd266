"""The round lifecycle: open -> committed | abandoned, then the next round opens by itself.

A round has a base model version, a goal K, room for ceil(K * over_select) assigned devices,
a deadline and a minimum number of updates to commit. It commits as soon as K updates have
arrived, or at the deadline with at least the minimum; otherwise it is abandoned. `tick()` does
that settling; it runs in the background (service/ticker.py), after every group of uploads
(service/writer.py) and at startup, never in a GET handler. Uploads check the deadline
themselves, so a stalled timer never lets a stale round take updates.

Every state change is one transaction, run under the store's lock (this process) and the
database's advisory locks (every replica, store/locks.py): settling a round takes the lifecycle
lock and the round's exclusive lock, then looks at the round again -- another replica may have
settled it meanwhile, and it then does nothing -- so a round is committed exactly once, by
whichever replica gets there first. Its commit sums the replicas' partial aggregates
(service/aggregates.py), writes the new model's bytes, registers the version and closes the round
in that one transaction; a crash anywhere in it leaves the round open with every acknowledged
update, and the next tick (on any replica, or at startup) commits it again, to the same weights.

A round trains on the *released* version (service/releases.py), or is a canary round on a candidate
for the canary devices only. The version a commit registers is a candidate; the release gate decides
on it before the next round opens, and a closed canary round promotes or holds back its candidate
(a crash between the commit and that decision leaves the canary in place: another canary round).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from coordinator.metrics import Metrics
from coordinator.service.aggregates import RoundAggregates, replica_name
from coordinator.service.cluster import SharedSettings
from coordinator.service.modelfile import expected_shapes, with_version
from coordinator.service.privacy import PrivacyLedger
from coordinator.service.releases import Releases
from coordinator.service.versions import ModelVersions, Registered
from coordinator.settings import RoundSettings
from coordinator.store import NewRound, RoundRow, Store, Writes
from coordinator.strategies import DifferentialPrivacy, NormBounded, RoundUpdates, Strategy, make_strategy
from coordinator.strategies.base import state_from_bytes, state_to_bytes
from coordinator.strategies.dp import count_stddev
from coordinator.strategies.influence import (
    InfluenceBounded,
    InfluenceLimits,
    bounded_by_default,
    round_limits,
)
from engine.serialize.container import loads

log = logging.getLogger("pocketfed.coordinator")


class RoundLifecycle:
    def __init__(
        self,
        settings: RoundSettings,
        store: Store,
        versions: ModelVersions,
        privacy: PrivacyLedger,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        replica: str | None = None,
        releases: Releases | None = None,
    ):
        self.store, self.versions, self.privacy, self.metrics, self.clock = store, versions, privacy, metrics, clock
        self.releases = releases or Releases(store, tolerance=0.02, canary_fraction=0.0, server_gate=False, clock=clock)
        self.replica = replica or replica_name(store)
        self.shared = SharedSettings(store, settings)  # round settings and `paused`, as every replica sees them
        self.aggregates = RoundAggregates(store, self.replica)
        self._strategies: dict[int, Strategy] = {}

    @property
    def round_settings(self) -> RoundSettings:
        """For rounds opened from now on, on every replica (PATCH /v1/admin/settings changes them)."""
        return self.shared.round_settings()

    @round_settings.setter
    def round_settings(self, new: RoundSettings) -> None:
        self.shared.set_round_settings(new)

    @property
    def paused(self) -> bool:
        return self.shared.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.shared.paused = value

    def current(self) -> RoundRow | None:
        """The open round (committed state, no lock)."""
        return self.store.open_round()

    def strategy_for(self, r: RoundRow) -> Strategy:
        """The round's strategy as configured when it opened, wrapped for DP or norm bounding."""
        strategy = self._strategies.get(r.id)
        if strategy is None:
            cfg = r.config
            strategy = make_strategy(cfg)
            if cfg.secure_aggregation:
                pass  # devices clip (and add their share of the DP noise) before masking: nothing to wrap
            elif r.dp_clip is not None:
                strategy = DifferentialPrivacy(
                    strategy,
                    clip_norm=r.dp_clip,
                    noise_multiplier=r.dp_noise,
                    seed=self.privacy.seed(r.id),
                    adaptive=cfg.dp_adaptive_clip,
                    target_quantile=cfg.dp_target_quantile,
                    clip_lr=cfg.dp_clip_lr,
                    count_stddev=count_stddev(cfg.dp_count_stddev, r.goal, float(r.dp_noise)),
                )
            elif cfg.norm_bound is not None:
                strategy = NormBounded(strategy, cfg.norm_bound)
            elif bounded_by_default(cfg):
                limits = self.influence_limits(r)
                log.info("round %d: deltas clipped to %.4g, weights capped at %g (%s)", r.id, *vars(limits).values())
                strategy = InfluenceBounded(strategy, limits)
            if len(self._strategies) >= 4:
                self._strategies.pop(min(self._strategies))
            self._strategies[r.id] = strategy
        return strategy

    def influence_limits(self, r: RoundRow) -> InfluenceLimits:
        """The default per-device bounds for round `r` (strategies/influence.py): from its base model
        and the last committed round before it (the same on every replica)."""
        container = self.versions.get(r.base_version).container
        trainable = [container.tensors[name] for name in expected_shapes(container)]
        previous = self.store.last_committed_before(r.id)
        updates = self.store.round_updates(previous) if previous is not None else []
        return round_limits(r.config, trainable, [u.norm for u in updates], [u.sample_count for u in updates])

    def start(self, initial_model: Callable[[], bytes]) -> None:
        """Idempotent recovery: adopt or store the round settings, drop orphan files, publish v0 if
        there is none, settle the open round."""
        with self.store.lock:
            self.shared.adopt()
            self.versions.recover(initial_model)
            self.releases.adopt()
            r = self.current()
            if r is not None:
                log.info("startup: round %d is open with %d/%d updates", r.id, r.received, r.goal)
            self.tick()

    def due(self, r: RoundRow) -> tuple[str, str] | None:
        """What settling the round would do now: ("commit" | "abandon", why), or None (leave it open)."""
        if r.config.secure_aggregation:
            return self._secagg_due(r)
        if r.received >= r.goal:
            return "commit", "goal reached"
        if self.clock() < r.deadline:
            return None
        if r.received >= r.min_updates:
            return "commit", f"deadline with {r.received}/{r.goal} updates"
        return "abandon", f"deadline with {r.received}/{r.goal} updates, fewer than the minimum {r.min_updates}"

    def _secagg_due(self, r: RoundRow) -> tuple[str, str] | None:
        """A secure-aggregation round commits when its sum is unmasked, is abandoned with the protocol's
        reason, or at the deadline before either."""
        phase, reason = self.store.secagg_phase(r.id) or ("joining", None)
        if phase == "done":
            return "commit", f"secure aggregation of {r.received} devices"
        if phase == "abandoned":
            return "abandon", f"secure aggregation abandoned: {reason}"
        if self.clock() < r.deadline:
            return None
        return "abandon", f"deadline in the secure-aggregation phase {phase}"

    def tick(self) -> None:
        """Settle the open round (commit at goal; commit or abandon at deadline); open one if none."""
        if not self.store.lock.held():  # fast path without the lock: an open round with nothing to settle
            r = self.current()
            if r is not None and self.due(r) is None:
                return
        with self.store.lock:
            r = self.current()
            if r is not None:
                if self.due(r) is None:
                    return
                self.settle(r.id)
                if self.current() is not None:  # still open (a failed commit), or the next one already
                    return
            if not self.releases.review():  # a candidate awaits its evaluation: open no round on a stale base
                return
            if not self.paused and self.privacy.budget_allows(self.round_settings):
                self._open()

    def settle(self, round_id: int) -> str | None:
        """Commit or abandon the round if it is open and due, under its exclusive lock: whichever
        replica runs this first settles it, the others find it closed. Returns what was done."""
        with self.store.lock:
            done = None
            with self.store.transaction() as tx:
                tx.own_lifecycle()
                tx.own_round(round_id)  # waits for acknowledgements in flight; later ones find it closed
                r = self.store.round(round_id)  # final now: its count includes every partial
                decision = self.due(r) if r is not None and r.is_open else None
                if decision is not None:
                    kind, reason = decision
                    if kind == "commit":
                        done = self._commit(tx, r, reason)
                    if done is None:
                        reason = reason if kind == "abandon" else "the aggregate produced non-finite weights"
                        self._abandon(tx, r, reason)
            self.aggregates.forget()
            if decision is None:
                return None
            self.releases.after_round(r.id, r.base_version, None if done is None else done.version)
            if done is None:
                self._closed(r, "abandoned", reason)
                return "abandoned"
            self.versions.announce(done, reason)
            log.info(
                "round %d committed -> model v%d: %s, %d updates, %g samples",
                r.id,
                done.version,
                reason,
                r.received,
                r.total_weight,
            )
            self._closed(r, "committed", reason)
            return "committed"

    def _closed(self, r: RoundRow, status: str, reason: str) -> None:
        if status == "abandoned":
            log.info("round %d abandoned: %s", r.id, reason)
        self.metrics.round_closed(status, self.clock() - r.opened_at)

    def _open(self) -> RoundRow | None:
        """Open the next round, unless another replica just did."""
        with self.store.transaction() as tx:
            tx.own_lifecycle()
            if self.store.open_round() is not None:
                return None
            cfg, now = self.round_settings, self.clock()
            new = self._new_round(cfg, now)
            round_id = tx.open_round(new)
        log.info(
            "round %d opened: base v%d, goal %d, deadline %.0fs, strategy %s",
            round_id,
            new.base_version,
            new.goal,
            cfg.deadline,
            cfg.strategy,
        )
        return self.store.round(round_id)

    def _new_round(self, cfg: RoundSettings, now: float) -> NewRound:
        """On the released version, or a canary round (fewer devices: the canaries) on the candidate."""
        base, canary = self.releases.round_base()
        # a canary round needs min_devices too (cfg.goal >= min_devices, so this stays within it)
        goal = max(self.releases.canary_goal(cfg.goal), cfg.min_devices) if canary else cfg.goal
        new = NewRound(
            base_version=base,
            config=cfg,
            goal=goal,
            max_assignments=math.ceil(goal * cfg.over_select - 1e-9),
            min_updates=max(min(cfg.min_devices, goal), math.ceil(goal * cfg.min_fraction - 1e-9)),
            opened_at=now,
            deadline=now + cfg.deadline,
            canary=canary,
        )
        if cfg.dp_enabled:
            noise = cfg.dp_noise_multiplier
            if cfg.secure_aggregation:  # the Gaussian z that bounds the devices' summed Skellam noise
                from coordinator.service.modelfile import expected_shapes
                from coordinator.service.secagg_config import charged_noise_multiplier

                shapes = expected_shapes(self.versions.get(new.base_version).container)
                noise = charged_noise_multiplier(cfg, sum(math.prod(s) for s in shapes.values()))
            new = replace(
                new,
                dp_clip=self.privacy.clip_for(cfg),
                dp_q=self.privacy.sampling_rate(cfg),
                dp_noise=noise,
            )
        return new

    def abandon(self, r: RoundRow, reason: str) -> None:
        """Abandon the round now (an operator's model superseded it), if it is still open."""
        with self.store.lock:
            with self.store.transaction() as tx:
                tx.own_lifecycle()
                tx.own_round(r.id)
                r = self.store.round(r.id)
                if r is None or not r.is_open:
                    return
                self._abandon(tx, r, reason)
            self.aggregates.forget()
            self.releases.after_round(r.id, r.base_version, None)
            self._closed(r, "abandoned", reason)

    def _abandon(self, tx: Writes, r: RoundRow, reason: str) -> None:
        tx.abandon_round(r.id, closed_at=self.clock(), reason=reason)
        tx.merge_partials(r.id, received=r.received, total_weight=r.total_weight, aggregate=None)

    def _collected(self, r: RoundRow, strategy: Strategy) -> RoundUpdates:
        norms = self.store.round_norms(r.id)
        if strategy.streaming:
            return RoundUpdates(running=self.aggregates.total(r), norms=norms)
        pairs = [(loads(blob).tensors, float(n)) for blob, n in self.store.round_deltas(r.id)]
        return RoundUpdates(pairs=pairs, norms=norms)

    def _commit(self, tx: Writes, r: RoundRow, reason: str) -> Registered | None:
        """Inside the settling transaction: the new version and the closed round (None: the aggregate
        gave non-finite weights, nothing was written)."""
        strategy = self.strategy_for(r)
        base = self.versions.get(r.base_version)
        collected = self._collected(r, strategy)
        delta = strategy.aggregate(collected)
        state_key = f"strategy_state/{strategy.name}"
        state = state_from_bytes(self.store.state(state_key))
        new_weights, new_state = strategy.step({k: base.container.tensors[k] for k in delta}, delta, state)
        if not all(np.all(np.isfinite(w)) for w in new_weights.values()):
            return None
        spend = None
        if isinstance(strategy, DifferentialPrivacy):
            spend = self.privacy.spend(r, strategy.next_clip_norm)
        elif r.dp_q is not None and r.config.secure_aggregation:  # distributed DP: the devices' noise
            spend = self.privacy.spend(r, None)
        registered = self.versions.register(
            tx,
            lambda version: with_version(
                base.container, version, new_weights, round_id=r.id, parent_version=r.base_version
            ),
            round_id=r.id,
        )
        tx.commit_round(r.id, closed_at=self.clock(), reason=reason, result_version=registered.version)
        total = collected.running.to_bytes() if collected.running is not None else None
        tx.merge_partials(r.id, received=r.received, total_weight=r.total_weight, aggregate=total)
        tx.set_state(state_key, state_to_bytes(new_state))
        if spend is not None:
            spend(tx)
        return registered

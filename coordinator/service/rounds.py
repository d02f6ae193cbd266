"""The round lifecycle: open -> committed | abandoned, then the next round opens by itself.

A round has a base model version, a goal K, room for ceil(K * over_select) assigned devices,
a deadline and a minimum number of updates to commit. It commits as soon as K updates have
arrived, or at the deadline with at least the minimum; otherwise it is abandoned. `tick()` does
that settling; it runs in the background (service/ticker.py), after every group of uploads
(service/writer.py) and at startup, never in a GET handler. Uploads check the deadline
themselves, so a stalled timer never lets a stale round take updates.

Every state change is one transaction, and all of them run under the store's lock. A commit
writes the new model file atomically, then registers it and closes the round in one transaction;
a crash in between leaves the round open with its full aggregate, and startup (which ticks too)
commits it again, to the same weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from coordinator.metrics import Metrics
from coordinator.service.modelfile import with_version
from coordinator.service.privacy import PrivacyLedger
from coordinator.service.versions import ModelVersions
from coordinator.settings import RoundSettings
from coordinator.store import NewRound, RoundRow, Store, Writes
from coordinator.strategies import DifferentialPrivacy, NormBounded, RoundUpdates, RunningSum, Strategy, make_strategy
from coordinator.strategies.base import state_from_bytes, state_to_bytes
from coordinator.strategies.dp import count_stddev
from engine.serialize.container import loads

log = logging.getLogger("pocketfed.coordinator")


class RunningAggregates:
    """The open round's running sum as of its last group commit, kept in memory so that neither the
    next group nor the commit has to parse the stored blob back."""

    def __init__(self, store: Store):
        self.store = store
        self._cached: tuple[int, int, RunningSum] | None = None  # (round, received, aggregate)

    def current(self, r: RoundRow) -> RunningSum:
        """A fresh copy of the round's aggregate (add() makes new arrays, so the copy is shallow)."""
        if self._cached is not None and self._cached[:2] == (r.id, r.received):
            cached = self._cached[2]
            return RunningSum(dict(cached.sums), cached.total_weight, cached.count)
        blob = r.aggregate if r.aggregate is not None else self.store.round(r.id, with_aggregate=True).aggregate
        return RunningSum.from_bytes(blob)

    def remember(self, round_id: int, received: int, running: RunningSum) -> None:
        self._cached = (round_id, received, running)


class RoundLifecycle:
    def __init__(
        self,
        settings: RoundSettings,
        store: Store,
        versions: ModelVersions,
        privacy: PrivacyLedger,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ):
        self.round_settings = settings  # for rounds opened from now on (PATCH /v1/admin/settings)
        self.store, self.versions, self.privacy, self.metrics, self.clock = store, versions, privacy, metrics, clock
        self.aggregates = RunningAggregates(store)
        self._strategies: dict[int, Strategy] = {}
        stored = store.state("paused")
        self.paused = stored == b"1"

    def current(self) -> RoundRow | None:
        """The open round (committed state, no lock)."""
        return self.store.open_round()

    def strategy_for(self, r: RoundRow) -> Strategy:
        """The round's strategy as configured when it opened, wrapped for DP or norm bounding."""
        strategy = self._strategies.get(r.id)
        if strategy is None:
            cfg = r.config
            strategy = make_strategy(cfg)
            if r.dp_clip is not None:
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
            if len(self._strategies) >= 4:
                self._strategies.pop(min(self._strategies))
            self._strategies[r.id] = strategy
        return strategy

    def start(self, initial_model: Callable[[], bytes]) -> None:
        """Idempotent recovery: drop orphan files, publish v0 if there is none, settle the open round."""
        with self.store.lock:
            self.versions.recover(initial_model)
            r = self.current()
            if r is not None:
                log.info("startup: round %d is open with %d/%d updates", r.id, r.received, r.goal)
            self.tick()

    def tick(self) -> None:
        """Settle the open round (commit at goal; commit or abandon at deadline); open one if none."""
        if not self.store.lock.held():  # fast path without the lock: an open round with nothing to settle
            r = self.current()
            if r is not None and r.received < r.goal and self.clock() < r.deadline:
                return
        with self.store.lock:
            r = self.current()
            if r is not None:
                if r.received >= r.goal:
                    self._commit(r, "goal reached")
                elif self.clock() >= r.deadline:
                    if r.received >= r.min_updates:
                        self._commit(r, f"deadline with {r.received}/{r.goal} updates")
                    else:
                        self.abandon(
                            r, f"deadline with {r.received}/{r.goal} updates, fewer than the minimum {r.min_updates}"
                        )
                else:
                    return
            if not self.paused and self.privacy.budget_allows(self.round_settings):
                self._open()

    def _open(self) -> RoundRow:
        cfg, now = self.round_settings, self.clock()
        new = NewRound(
            base_version=self.versions.latest(),
            config=cfg,
            goal=cfg.goal,
            max_assignments=math.ceil(cfg.goal * cfg.over_select - 1e-9),
            min_updates=max(1, math.ceil(cfg.goal * cfg.min_fraction - 1e-9)),
            opened_at=now,
            deadline=now + cfg.deadline,
        )
        if cfg.dp_enabled:
            new = replace(
                new,
                dp_clip=self.privacy.clip_for(cfg),
                dp_q=self.privacy.sampling_rate(cfg),
                dp_noise=cfg.dp_noise_multiplier,
            )
        with self.store.transaction() as tx:
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

    def abandon(self, r: RoundRow, reason: str) -> None:
        now = self.clock()
        with self.store.transaction() as tx:
            tx.abandon_round(r.id, closed_at=now, reason=reason)
        log.info("round %d abandoned: %s", r.id, reason)
        self.metrics.round_closed("abandoned", now - r.opened_at)

    def _collected(self, r: RoundRow, strategy: Strategy) -> RoundUpdates:
        norms = self.store.round_norms(r.id)
        if strategy.streaming:
            return RoundUpdates(running=self.aggregates.current(r), norms=norms)
        pairs = [(loads(blob).tensors, float(n)) for blob, n in self.store.round_deltas(r.id)]
        return RoundUpdates(pairs=pairs, norms=norms)

    def _commit(self, r: RoundRow, reason: str) -> None:
        strategy = self.strategy_for(r)
        base = self.versions.get(r.base_version)
        delta = strategy.aggregate(self._collected(r, strategy))
        state_key = f"strategy_state/{strategy.name}"
        state = state_from_bytes(self.store.state(state_key))
        new_weights, new_state = strategy.step({k: base.container.tensors[k] for k in delta}, delta, state)
        if not all(np.all(np.isfinite(w)) for w in new_weights.values()):
            self.abandon(r, "the aggregate produced non-finite weights")
            return
        data = with_version(
            base.container, self.versions.latest() + 1, new_weights, round_id=r.id, parent_version=r.base_version
        )
        state_bytes = state_to_bytes(new_state)
        spend = None
        if isinstance(strategy, DifferentialPrivacy):
            spend = self.privacy.spend(r, strategy.next_clip_norm)
        now = self.clock()

        def close(tx: Writes, version: int) -> None:
            tx.commit_round(r.id, closed_at=now, reason=reason, result_version=version)
            tx.set_state(state_key, state_bytes)
            if spend is not None:
                spend(tx)

        version = self.versions.publish(data, round_id=r.id, reason=reason, then=close)
        log.info(
            "round %d committed -> model v%d: %s, %d updates, %g samples",
            r.id,
            version,
            reason,
            r.received,
            r.total_weight,
        )
        self.metrics.round_closed("committed", now - r.opened_at)

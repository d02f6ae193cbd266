"""Operator calls: pause and resume round scheduling, change round settings, publish a model."""

from __future__ import annotations

import logging
from typing import Any

from coordinator.errors import Refused
from coordinator.service import privacy
from coordinator.service.releases import ReleaseState
from coordinator.service.rounds import RoundLifecycle
from coordinator.service.versions import ModelVersions
from coordinator.settings import RoundSettings
from coordinator.store import Store

log = logging.getLogger("pocketfed.coordinator")


class Admin:
    def __init__(self, store: Store, versions: ModelVersions, lifecycle: RoundLifecycle):
        self.store, self.versions, self.lifecycle = store, versions, lifecycle

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) opening rounds; the open one still settles. Resuming opens one at once."""
        with self.store.lock:
            with self.store.transaction() as tx:
                tx.set_state("paused", "1" if paused else "0")
            self.lifecycle.paused = paused
            log.info("round scheduling %s", "paused" if paused else "resumed")
            self.lifecycle.tick()

    def update_settings(self, changes: dict[str, Any]) -> RoundSettings:
        """Validated round-setting changes (pydantic's ValidationError otherwise); they apply from
        the next round on, on every replica (coordinator/settings.py says how long they last)."""
        with self.store.lock:
            new = RoundSettings(**{**self.lifecycle.round_settings.model_dump(), **changes})
            if new.dp_enabled:
                try:
                    privacy.require_accountant()
                except ValueError as exc:
                    raise Refused(422, f"dp_noise_multiplier: {exc}", "bad_settings") from None
            if new.secure_aggregation:
                from coordinator.service.secagg_config import require_cryptography

                try:
                    require_cryptography()
                except ValueError as exc:
                    raise Refused(422, f"secure_aggregation: {exc}", "bad_settings") from None
            self.lifecycle.round_settings = new
        log.info("round settings changed: %s", changes)
        return new

    def publish(self, data: bytes, actor: str = "admin") -> int:
        """An operator's model replaces the base (released at once, recorded in the release audit): the
        open round is abandoned, a new one opens on it."""
        reason = "published by the operator"
        with self.store.lock:
            releases = self.lifecycle.releases
            version = self.versions.publish(
                data, reason=reason, then=lambda tx, v: releases.release_now(tx, v, actor, reason)
            )
            r = self.lifecycle.current()
            if r is not None:
                self.lifecycle.abandon(r, f"superseded by published model v{version}")
            self.lifecycle.tick()
        return version

    def set_released(self, version: int, *, action: str, actor: str, reason: str, pin: bool) -> ReleaseState:
        """Roll back to (or pin) a version: devices get it as their base from now on; an open round on
        another base is abandoned and the next opens on it."""
        with self.store.lock:
            state = self.lifecycle.releases.set_released(version, action=action, actor=actor, reason=reason, pin=pin)
            self._restart_round(f"{action} to v{version}")
        return state

    def unpin(self, actor: str, reason: str) -> ReleaseState:
        with self.store.lock:
            self.lifecycle.releases.unpin(actor, reason)
            self.lifecycle.releases.review()  # the newest waiting candidate, now
            self._restart_round("unpinned")
        return self.lifecycle.releases.state()

    def _restart_round(self, why: str) -> None:
        r = self.lifecycle.current()
        if r is not None and r.base_version != self.lifecycle.releases.released():
            self.lifecycle.abandon(r, f"superseded: {why}")
        self.lifecycle.tick()

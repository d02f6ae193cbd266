"""What every replica must agree on lives in the database, never only in one replica's memory.

- **Round settings** (`PATCH /v1/admin/settings`): server_state holds the settings rounds open with,
  plus the startup options they derive from. A replica started with the same round options as the
  stored ones adopts the stored settings (an operator's change survives the restart of any
  replica); one started with other options makes its options the settings of every replica.
- **Paused**: server_state; each replica re-reads it at most `RECHECK` seconds after its last look.
- **The lease** on background work (deadlines, evaluation): one replica at a time runs it, renewing
  the lease every tick; when the holder dies, another takes over once the lease expires. Every round
  change is safe whoever makes it (store/locks.py), so the lease only keeps replicas from all doing
  the same periodic work. On SQLite there is one process and the lease is always held.
"""

from __future__ import annotations

import json
import logging
import time

from coordinator.settings import RoundSettings
from coordinator.store import Store
from coordinator.store.rows import parse_config

log = logging.getLogger("pocketfed.coordinator")

PAUSED, ROUND_SETTINGS = "paused", "round_settings"
RECHECK = 1.0  # seconds a replica trusts its last look at a flag another replica may change
LEASE = "background"


class SharedSettings:
    def __init__(self, store: Store, startup: RoundSettings):
        self.store, self.startup = store, startup
        self._paused: tuple[bool, float] | None = None  # (value, when read)

    def adopt(self) -> None:
        """Startup: keep the stored settings if they derive from these same options, else store these."""
        base = self.startup.model_dump_json()
        with self.store.transaction() as tx:
            tx.own_lifecycle()
            stored = self._stored()
            if stored is None or stored.get("base") != base:
                tx.set_state(ROUND_SETTINGS, json.dumps({"base": base, "current": base}))

    def _stored(self) -> dict | None:
        raw = self.store.state(ROUND_SETTINGS)
        return json.loads(raw) if raw else None

    def round_settings(self) -> RoundSettings:
        stored = self._stored()
        return parse_config(stored["current"]) if stored else self.startup

    def set_round_settings(self, new: RoundSettings) -> None:
        with self.store.transaction() as tx:
            tx.own_lifecycle()
            base = (self._stored() or {}).get("base", self.startup.model_dump_json())
            tx.set_state(ROUND_SETTINGS, json.dumps({"base": base, "current": new.model_dump_json()}))

    @property
    def paused(self) -> bool:
        cached = self._paused
        if cached is not None and (not self.store.shared or time.monotonic() - cached[1] < RECHECK):
            return cached[0]
        value = self.store.state(PAUSED) == b"1"
        self._paused = (value, time.monotonic())
        return value

    @paused.setter
    def paused(self, value: bool) -> None:
        """What this replica just wrote to server_state (the admin service writes it)."""
        self._paused = (bool(value), time.monotonic())


class Lease:
    """The background-work lease of this replica (`seconds` long, renewed by `hold()` every tick)."""

    def __init__(self, store: Store, holder: str, seconds: float):
        self.store, self.holder, self.seconds = store, holder, seconds
        self.held = not store.shared  # SQLite: the one process always holds it

    def hold(self) -> bool:
        """Take or renew the lease; False when another live replica holds it (or the database is away)."""
        if not self.store.shared:
            return True
        try:
            held = self.store.try_lease(LEASE, self.holder, self.seconds)
        except Exception as exc:  # SQLAlchemy's or the driver's (a raw pooled connection): try next tick
            log.warning("cannot renew the background lease: %s", exc)
            held = False
        if held != self.held:
            log.info("replica %s %s the background lease", self.holder, "took" if held else "lost")
        self.held = held
        return held

    def release(self) -> None:
        """On a clean shutdown: let another replica take over at once instead of after expiry."""
        if self.store.shared and self.held:
            try:
                self.store.release_lease(LEASE, self.holder)
            except Exception as exc:
                log.warning("cannot release the background lease: %s", exc)
            self.held = False

"""The store: every SQL statement the coordinator runs, behind typed methods.

This class is the interface a storage backend offers the services. It is written once over
SQLAlchemy Core and runs unchanged on SQLite and PostgreSQL; what differs between them (pragmas,
BEGIN IMMEDIATE, read connections) lives in database.py. Reads are methods here; writes are
methods of the `Writes` that `transaction()` yields. Every statement is built once at import, the
reads in queries.py, the writes in writes.py (and a read compiled once per database: database.py's `fetch`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from coordinator.store import migrate
from coordinator.store import queries as q
from coordinator.store.database import Database
from coordinator.store.rows import DeviceRow, ModelVersionRow, PartialRow, ReleaseRow, RoundRow, SecAggRow, UpdateRow
from coordinator.store.write_statements import PRUNE_RATE_LIMITS, hit_statement, lease_statements
from coordinator.store.writes import Writes


class Store:
    """The coordinator's durable state (devices, model versions, rounds, assignments, updates,
    server state). `readonly=True` opens an existing database without migrating it (the audit)."""

    def __init__(self, db: str, *, readonly: bool = False, pool_size: int = 4):
        self.db = Database(db, readonly=readonly, pool_size=pool_size)
        self.lock = self.db.lock
        self.dialect = self.db.dialect
        self.label = self.db.label
        self.shared = self.db.shared  # other processes (replicas) may write it at the same time
        self.revision: str | None = None
        if not readonly:
            with self.db.transaction() as conn:
                self.revision = migrate.upgrade(conn)

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[Writes]:
        with self.db.transaction(durable) as conn:
            yield Writes(conn, self.dialect)

    def close(self) -> None:
        self.db.close()

    def _first(self, statement: sa.Executable, params: dict[str, Any] | None = None) -> tuple | None:
        rows = self.db.fetch(statement, params)
        return rows[0] if rows else None

    def _scalar(self, statement: sa.Executable, params: dict[str, Any] | None = None) -> Any:
        rows = self.db.fetch(statement, params)
        return rows[0][0] if rows else None

    def _all(self, statement: sa.Executable, params: dict[str, Any] | None = None) -> list[tuple]:
        return self.db.fetch(statement, params)

    # ------------------------------------------------------------------ devices

    def device_by_token(self, token_hash: str) -> DeviceRow | None:
        row = self._first(q.DEVICE_BY_TOKEN, {"token_hash": token_hash})
        return DeviceRow(*row) if row else None

    def device_activity(self, device_id: str) -> tuple[float, int, int] | None:
        """(created_at, rounds assigned, updates accepted) of one device."""
        row = self._first(q.DEVICE_ACTIVITY, {"d": device_id})
        return tuple(row) if row else None

    def count_devices(self) -> int:
        return int(self._scalar(q.COUNT_DEVICES))

    def count_active_devices(self, since: float) -> int:
        """Devices that checked in since then (last_seen is kept to the minute)."""
        return int(self._scalar(q.COUNT_ACTIVE_DEVICES, {"since": since}))

    def device_tokens(self) -> dict[str, str]:
        return dict(self._all(q.DEVICE_TOKENS))

    # ------------------------------------------------------------------ model versions

    def latest_version(self) -> int:
        """The newest registered version, or -1 when there is none."""
        value = self._scalar(q.LATEST_VERSION)
        return -1 if value is None else int(value)

    def version(self, version: int) -> ModelVersionRow | None:
        row = self._first(q.VERSION_BY_NUMBER, {"v": version})
        return ModelVersionRow(*row) if row else None

    def versions(self, limit: int | None = None) -> list[ModelVersionRow]:
        """Newest first (`limit` of them), or every version oldest first without a limit."""
        if limit is None:
            return [ModelVersionRow(*r) for r in self._all(q.ALL_VERSIONS)]
        return [ModelVersionRow(*r) for r in self._all(q.VERSIONS_NEWEST_FIRST, {"limit": limit})]

    def version_filenames(self) -> set[str]:
        return {r[0] for r in self._all(q.VERSION_FILENAMES)}

    def unevaluated_versions(self) -> list[int]:
        return [r[0] for r in self._all(q.UNEVALUATED)]

    def latest_accuracy(self) -> float | None:
        return self._scalar(q.LATEST_ACCURACY)

    # ------------------------------------------------------------------ rounds

    def open_round(self) -> RoundRow | None:
        row = self._first(q.OPEN_ROUND)
        return RoundRow.from_row(row) if row else None

    def round(self, round_id: int, *, with_aggregate: bool = False) -> RoundRow | None:
        row = self._first(q.ROUND_WITH_AGGREGATE if with_aggregate else q.ROUND_BY_ID, {"id": round_id})
        return RoundRow.from_row(row) if row else None

    def rounds(self, limit: int | None = None) -> list[RoundRow]:
        """Newest first (`limit` of them), or every round oldest first with its aggregate."""
        if limit is None:
            return [RoundRow.from_row(r) for r in self._all(q.ALL_ROUNDS_WITH_AGGREGATE)]
        return [RoundRow.from_row(r) for r in self._all(q.RECENT_ROUNDS, {"limit": limit})]

    def last_committed_before(self, round_id: int) -> int | None:
        """The newest committed round before `round_id` (the reference for influence bounds)."""
        found = self._scalar(q.LAST_COMMITTED_BEFORE, {"r": round_id})
        return None if found is None else int(found)

    def rounds_by_status(self) -> dict[str, int]:
        return dict(self._all(q.ROUNDS_BY_STATUS))

    def dp_events(self) -> list[tuple[float, float]]:
        """(sampling rate q, noise multiplier z) of every committed DP round, in order."""
        return [(float(q), float(z)) for q, z in self._all(q.DP_EVENTS)]

    def last_epsilon(self) -> tuple[float, float] | None:
        """(epsilon, clip norm) of the last round that spent privacy budget."""
        row = self._first(q.LAST_EPSILON)
        return (row[0], row[1]) if row else None

    # ------------------------------------------------------------------ assignments and updates

    def is_assigned(self, round_id: int, device_id: str) -> bool:
        return self._first(q.IS_ASSIGNED, {"r": round_id, "d": device_id}) is not None

    def count_assigned(self, round_id: int) -> int:
        return int(self._scalar(q.COUNT_ASSIGNED, {"r": round_id}))

    def assigned_per_round(self, round_ids: list[int]) -> dict[int, int]:
        if not round_ids:
            return {}
        counts = dict(self._all(q.ASSIGNED_PER_ROUND, {"lo": min(round_ids), "hi": max(round_ids)}))
        return {i: counts[i] for i in round_ids if i in counts}

    def answer_for_key(self, device_id: str, key: str) -> dict | None:
        """The 202 an update with this Idempotency-Key already got, if any."""
        text = self._scalar(q.ANSWER_FOR_KEY, {"d": device_id, "k": key})
        return json.loads(text) if text is not None else None

    def has_update(self, round_id: int, device_id: str) -> bool:
        return self._first(q.HAS_UPDATE, {"r": round_id, "d": device_id}) is not None

    def round_updates(self, round_id: int) -> list[UpdateRow]:
        """A round's accepted updates (without deltas), in the order received."""
        return [UpdateRow.from_row(r) for r in self._all(q.ROUND_UPDATES, {"r": round_id})]

    def round_deltas(self, round_id: int) -> list[tuple[bytes, int]]:
        """(stored delta, sample count) of a non-streaming round's updates."""
        return [(r[0], int(r[1])) for r in self._all(q.ROUND_DELTAS, {"r": round_id})]

    def round_norms(self, round_id: int) -> list[float]:
        """Each accepted update's L2 norm as it arrived (before any clipping)."""
        return [float(r[0]) for r in self._all(q.ROUND_NORMS, {"r": round_id})]

    def count_updates(self) -> int:
        return int(self._scalar(q.COUNT_UPDATES))

    def updates_in_acceptance_order(self) -> list[UpdateRow]:
        """Every accepted update (the audit). SQLite orders by rowid, the insertion order; PostgreSQL
        by arrival time, which leaves updates of one group commit in no particular order."""
        return [UpdateRow.from_row(r) for r in self._all(q.UPDATES_BY_ACCEPTANCE[self.dialect])]

    # ------------------------------------------------------------------ partial aggregates (replicas)

    def partial_count(self, round_id: int, replica: str) -> int | None:
        """Updates `replica` folded into its partial of the round so far (None: no partial yet)."""
        return self._scalar(q.PARTIAL_COUNT, {"r": round_id, "replica": replica})

    def partial_aggregate(self, round_id: int, replica: str) -> bytes | None:
        return _as_bytes(self._scalar(q.PARTIAL_AGGREGATE, {"r": round_id, "replica": replica}))

    def round_partials(self, round_id: int, *, with_aggregate: bool = True) -> list[PartialRow]:
        """Every replica's partial of a round, by replica name, with its running sum if asked (NULL once
        the round closed)."""
        if not with_aggregate:
            return [PartialRow(*r) for r in self._all(q.ROUND_PARTIALS, {"r": round_id})]
        return [PartialRow(*r[:4], _as_bytes(r[4])) for r in self._all(q.ROUND_PARTIALS_WITH_SUMS, {"r": round_id})]

    def partials(self) -> list[PartialRow]:
        """Every partial of every round, without sums (the audit)."""
        return [PartialRow(*r) for r in self._all(q.ALL_PARTIALS)]

    # ------------------------------------------------------------------ model blobs, leases, counters

    def model_blob(self, name: str) -> bytes | None:
        return _as_bytes(self._scalar(q.MODEL_BLOB, {"name": name}))

    def model_blob_names(self) -> set[str]:
        return {r[0] for r in self._all(q.BLOB_NAMES)}

    def try_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Take or renew the lease `name` for `seconds` if it is free, expired or already ours (one
        atomic statement; expiry on the database server's clock, which every replica shares)."""
        return bool(
            self.db.execute_now(lease_statements(self.dialect)[0], {"name": name, "me": holder, "ttl": seconds})
        )

    def release_lease(self, name: str, holder: str) -> None:
        self.db.execute_now(lease_statements(self.dialect)[1], {"name": name, "me": holder})

    def lease_holder(self, name: str) -> str | None:
        rows = self.db.execute_now(lease_statements(self.dialect)[2], {"name": name})
        return rows[0][0] if rows else None

    def hit(self, key: str, window: float, now: float) -> int:
        """Count one hit on `key` in the current fixed window of `window` seconds; returns the hits
        so far in it, from every replica (an atomic upsert)."""
        start = int(now // window * window)
        return int(self.db.execute_now(hit_statement(self.dialect), {"key": key, "start": start})[0][0])

    def prune_rate_limits(self, before: float) -> None:
        """Forget the counters of windows that started before `before` (one row per key and window
        would otherwise pile up forever)."""
        self.db.execute_now(PRUNE_RATE_LIMITS, {"before": int(before)})

    # ------------------------------------------------------------------ releases

    def releases(self, limit: int = 100) -> list[ReleaseRow]:
        """The release audit, newest first."""
        return [ReleaseRow(*r) for r in self._all(q.RELEASES_NEWEST_FIRST, {"limit": limit})]

    def decided_versions(self) -> set[int]:
        """Versions the release audit has a row for (a candidate without one is still undecided)."""
        return {r[0] for r in self._all(q.DECIDED_VERSIONS)}

    def committed_rounds_on(self, version: int, limit: int = 3) -> list[int]:
        """The newest committed rounds of the whole fleet (not canary rounds) that trained on `version`."""
        return [r[0] for r in self._all(q.ROUNDS_ON_BASE, {"v": version, "limit": limit})]

    def round_metric_mean(self, round_ids: list[int], name: str) -> tuple[float, int] | None:
        """(sample-weighted mean of one uploaded metric over these rounds' updates, samples), or None."""
        total = weight = 0.0
        for round_id in round_ids:
            for text, n in self._all(q.UPDATE_METRICS, {"r": round_id}):
                value = json.loads(text).get(name)
                if isinstance(value, int | float) and n > 0:
                    total, weight = total + float(value) * n, weight + n
        return (total / weight, int(weight)) if weight > 0 else None

    # ------------------------------------------------------------------ populations

    def populations(self) -> dict[str, tuple]:
        """name -> (name, enrollment key hash, architecture, created_at, created_by)."""
        return {r[0]: tuple(r) for r in self._all(q.POPULATIONS)}

    def rate_hits(self, key: str, window_start: int) -> int:
        """Hits counted on `key` in the window starting at `window_start` (0 if none)."""
        return int(self._scalar(q.RATE_HITS, {"key": key, "start": window_start}) or 0)

    # ------------------------------------------------------------------ server state

    def secagg(self, round_id: int, *, with_state: bool = False) -> SecAggRow | None:
        """A secure-aggregation round's row; its (large) session state only when asked for."""
        row = self._first(q.SECAGG_WITH_STATE if with_state else q.SECAGG, {"r": round_id})
        return SecAggRow.from_row(row) if row else None

    def secagg_messages(self, round_id: int, after: int) -> list[tuple[int, str, bytes]]:
        """(seq, kind, body) of the messages a secure-aggregation round accepted after revision `after`."""
        return [(s, k, bytes(b)) for s, k, b in self._all(q.SECAGG_MESSAGES, {"r": round_id, "after": after})]

    def secagg_phase(self, round_id: int) -> tuple[str, str | None] | None:
        """(phase, reason) of a secure-aggregation round, without its state."""
        row = self._first(q.SECAGG_PHASE, {"r": round_id})
        return (row[0], row[1]) if row else None

    def state(self, key: str) -> bytes | None:
        return _as_bytes(self._scalar(q.STATE, {"key": key}))

    def state_items(self) -> list[tuple[str, bytes]]:
        return [(key, _as_bytes(value)) for key, value in self._all(q.STATE_ITEMS)]


def _as_bytes(value: Any) -> bytes | None:
    """server_state values: text written by earlier versions ('1', a seed) reads back as UTF-8 bytes."""
    return value.encode() if isinstance(value, str) else None if value is None else bytes(value)

"""Every write, on one open transaction (`Store.transaction()` hands out a `Writes`).

Statements are built once at import; SQLAlchemy caches their compiled form. Upserts use the
dialect's own INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL spell it alike).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from functools import cache

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from coordinator.store import locks
from coordinator.store.rows import NewRound, SecAggRow, UpdateRow
from coordinator.store.schema import (
    assignments,
    devices,
    enrollment_codes,
    leases,
    model_blobs,
    model_versions,
    populations,
    rate_limits,
    releases,
    round_partials,
    rounds,
    secagg_messages,
    secagg_rounds,
    server_state,
    updates,
)

_b = sa.bindparam


@cache
def _state_statements(dialect: str) -> tuple[sa.Insert, sa.Insert]:
    """(upsert, insert-if-missing) of a server_state row, in the dialect's INSERT ... ON CONFLICT."""
    insert = _insert(dialect)
    upsert = insert(server_state).values(key=_b("key"), value=_b("value"))
    upsert = upsert.on_conflict_do_update(index_elements=[server_state.c.key], set_={"value": upsert.excluded.value})
    return upsert, insert(server_state).on_conflict_do_nothing()


def _insert(dialect: str):
    return importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert


def _server_now(dialect: str) -> sa.ColumnElement:
    """Seconds since the epoch on the database server's clock (one clock for every replica)."""
    if dialect == "postgresql":
        return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double)
    return (sa.func.julianday("now") - 2440587.5) * 86400.0


@cache
def lease_statements(dialect: str) -> tuple[sa.Insert, sa.Delete, sa.Select]:
    """(take or renew -> the holder if it is us, release, current holder) of a lease."""
    now = _server_now(dialect)
    take = _insert(dialect)(leases).values(
        name=_b("name"), holder=_b("me"), expires_at=now + _b("ttl", type_=sa.Double)
    )
    take = take.on_conflict_do_update(
        index_elements=[leases.c.name],
        set_={"holder": take.excluded.holder, "expires_at": take.excluded.expires_at},
        where=(leases.c.holder == take.excluded.holder) | (leases.c.expires_at < now),
    ).returning(leases.c.holder)
    release = sa.delete(leases).where(leases.c.name == _b("name"), leases.c.holder == _b("me"))
    holder = sa.select(leases.c.holder).where(leases.c.name == _b("name"), leases.c.expires_at >= now)
    return take, release, holder


@cache
def hit_statement(dialect: str) -> sa.Insert:
    """One more hit on (key, window start), returning the window's hits."""
    hit = _insert(dialect)(rate_limits).values(key=_b("key"), window_start=_b("start"), hits=1)
    return hit.on_conflict_do_update(
        index_elements=[rate_limits.c.key, rate_limits.c.window_start], set_={"hits": rate_limits.c.hits + 1}
    ).returning(rate_limits.c.hits)


@cache
def _add_partial(dialect: str) -> sa.Insert:
    """A replica's first fold into a round; nothing if the row exists (then its view was stale)."""
    return _insert(dialect)(round_partials).on_conflict_do_nothing().returning(round_partials.c.received)


@cache
def _add_assignment(dialect: str) -> sa.Insert:
    return _insert(dialect)(assignments).on_conflict_do_nothing()


@cache
def _add_update(dialect: str) -> sa.Insert:
    """An update's row, or nothing when its (round, device) or (device, key) is already taken: by
    another replica's acknowledgement, committed meanwhile (PostgreSQL waits for it to commit).
    RETURNING says which (the DBAPI's rowcount is not reliable for INSERT on every driver)."""
    return _insert(dialect)(updates).on_conflict_do_nothing().returning(updates.c.round_id)


ADD_DEVICE = sa.insert(devices)
ADD_CODE = sa.insert(enrollment_codes)
SPEND_CODE = (
    sa.update(enrollment_codes)
    .where(
        enrollment_codes.c.code_hash == _b("hash"),
        enrollment_codes.c.used_at.is_(None),
        enrollment_codes.c.expires_at > _b("now"),
    )
    .values(used_at=_b("now"), device_id=_b("spender"))
)
SET_TOKEN = sa.update(devices).where(devices.c.id == _b("for_id")).values(token_hash=_b("new_hash"))
TOUCH_DEVICE = sa.update(devices).where(devices.c.id == _b("device_id")).values(last_seen=_b("seen"))
ADD_VERSION = sa.insert(model_versions)
SET_EVALUATION = (
    sa.update(model_versions)
    .where(model_versions.c.version == _b("v"))
    .values(accuracy=_b("accuracy"), eval_loss=_b("loss"), eval_n=_b("n"))
)
OPEN_ROUND = sa.insert(rounds)
CLOSE_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(status=_b("status"), closed_at=_b("closed_at"), reason=_b("reason"), result_version=_b("result"))
)
ABANDON_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(status="abandoned", closed_at=_b("closed_at"), reason=_b("reason"), aggregate=None)
)
FOLD_INTO_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(
        received=rounds.c.received + _b("added"),
        total_weight=rounds.c.total_weight + _b("samples"),
        aggregate=_b("aggregate"),
    )
)
FOLD_COUNTS_INTO_ROUND = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(received=rounds.c.received + _b("added"), total_weight=rounds.c.total_weight + _b("samples"))
)
SET_EPSILON = sa.update(rounds).where(rounds.c.id == _b("round_id")).values(epsilon=_b("eps"))
SET_ROUND_TOTALS = (
    sa.update(rounds)
    .where(rounds.c.id == _b("round_id"))
    .values(received=_b("received"), total_weight=_b("weight"), aggregate=_b("aggregate"))
)

_this_partial = (round_partials.c.round_id == _b("r"), round_partials.c.replica == _b("rep"))
GROW_PARTIAL = (  # only from the count this replica last wrote: a stale view changes nothing
    sa.update(round_partials)
    .where(*_this_partial, round_partials.c.received == _b("expected"))
    .values(
        received=round_partials.c.received + _b("added"),
        total_weight=round_partials.c.total_weight + _b("samples"),
        aggregate=_b("aggregate"),
    )
    .returning(round_partials.c.received)
)
GROW_PARTIAL_COUNTS = (
    sa.update(round_partials)
    .where(*_this_partial, round_partials.c.received == _b("expected"))
    .values(
        received=round_partials.c.received + _b("added"), total_weight=round_partials.c.total_weight + _b("samples")
    )
    .returning(round_partials.c.received)
)
DROP_PARTIAL_SUMS = sa.update(round_partials).where(round_partials.c.round_id == _b("r")).values(aggregate=None)
ADD_BLOB = sa.insert(model_blobs)
ADD_RELEASE = sa.insert(releases)
ADD_POPULATION = sa.insert(populations)


ADD_SECAGG = sa.insert(secagg_rounds)
_SECAGG_COLUMNS = ("phase", "members", "phase_started", "revision", "reason")
_SECAGG_ROW = secagg_rounds.c.round_id == _b("r"), secagg_rounds.c.revision == _b("expected")
UPDATE_SECAGG_KEEPING_STATE = (
    sa.update(secagg_rounds).where(*_SECAGG_ROW).values({c: _b(f"new_{c}") for c in _SECAGG_COLUMNS})
)
UPDATE_SECAGG = (
    sa.update(secagg_rounds)
    .where(*_SECAGG_ROW)
    .values({c: _b(f"new_{c}") for c in (*_SECAGG_COLUMNS, "state", "state_revision")})
)
ADD_SECAGG_MESSAGE = sa.insert(secagg_messages)
DROP_SECAGG_MESSAGES = sa.delete(secagg_messages).where(
    secagg_messages.c.round_id == _b("r"), secagg_messages.c.seq <= _b("through")
)


class StalePartial(RuntimeError):
    """A replica's partial changed under it (its in-memory view was stale): the group is redone."""


class Writes:
    """The writes one transaction may make; reads inside it go through Store (same connection)."""

    def __init__(self, conn: Connection, dialect: str):
        self.conn, self.dialect = conn, dialect

    # ------------------------------------------------------------------ devices

    def add_device(self, device_id: str, token_hash: str, name: str | None, created_at: float) -> None:
        self.conn.execute(
            ADD_DEVICE, {"id": device_id, "token_hash": token_hash, "name": name, "created_at": created_at}
        )

    def add_enrollment_code(self, code_hash: str, created_at: float, expires_at: float) -> None:
        self.conn.execute(ADD_CODE, {"code_hash": code_hash, "created_at": created_at, "expires_at": expires_at})

    def spend_enrollment_code(self, code_hash: str, device_id: str, now: float) -> bool:
        """Mark an unspent, unexpired code as spent by `device_id`; False if there is no such code."""
        return self.conn.execute(SPEND_CODE, {"hash": code_hash, "spender": device_id, "now": now}).rowcount == 1

    def hit(self, key: str, window: float, now: float) -> int:
        """Store.hit inside this transaction (so a refused request's hit is rolled back with it)."""
        start = int(now // window * window)
        return int(self.conn.execute(hit_statement(self.dialect), {"key": key, "start": start}).scalar_one())

    def set_token_hash(self, device_id: str, new_hash: str) -> bool:
        """Replace the device's token (the old one then gets 401); False if there is no such device."""
        return self.conn.execute(SET_TOKEN, {"for_id": device_id, "new_hash": new_hash}).rowcount == 1

    def revoke_device(self, device_id: str) -> bool:
        """Forget the device's token; False if there is no such device."""
        return self.set_token_hash(device_id, f"revoked:{device_id}")  # unique, never a token's sha256

    def touch_devices(self, seen: Iterable[tuple[str, float]]) -> None:
        """last_seen for each (device id, time)."""
        params = [{"device_id": device_id, "seen": at} for device_id, at in seen]
        if params:
            self.conn.execute(TOUCH_DEVICE, params)

    # ------------------------------------------------------------------ model versions

    def add_version(
        self,
        version: int,
        *,
        sha256: str,
        filename: str,
        architecture: str,
        size_bytes: int,
        num_parameters: int,
        created_at: str,
        round_id: int | None,
    ) -> None:
        self.conn.execute(
            ADD_VERSION,
            {
                "version": version,
                "sha256": sha256,
                "filename": filename,
                "architecture": architecture,
                "size_bytes": size_bytes,
                "num_parameters": num_parameters,
                "created_at": created_at,
                "round_id": round_id,
            },
        )

    def set_evaluation(self, version: int, accuracy: float, loss: float, n: int) -> None:
        self.conn.execute(SET_EVALUATION, {"v": version, "accuracy": accuracy, "loss": loss, "n": n})

    # ------------------------------------------------------------------ rounds

    def open_round(self, new: NewRound) -> int:
        result = self.conn.execute(
            OPEN_ROUND,
            {
                "base_version": new.base_version,
                "status": "open",
                "config": new.config.model_dump_json(),
                "goal": new.goal,
                "max_assignments": new.max_assignments,
                "min_updates": new.min_updates,
                "opened_at": new.opened_at,
                "deadline": new.deadline,
                "dp_clip": new.dp_clip,
                "dp_q": new.dp_q,
                "dp_noise": new.dp_noise,
                "canary": int(new.canary),
            },
        )
        return int(result.inserted_primary_key[0])

    def commit_round(self, round_id: int, *, closed_at: float, reason: str, result_version: int) -> None:
        params = {"round_id": round_id, "status": "committed", "closed_at": closed_at, "reason": reason}
        self.conn.execute(CLOSE_ROUND, {**params, "result": result_version})

    def abandon_round(self, round_id: int, *, closed_at: float, reason: str) -> None:
        """Abandoned: its aggregate is dropped (no version will ever use it)."""
        self.conn.execute(ABANDON_ROUND, {"round_id": round_id, "closed_at": closed_at, "reason": reason})

    def fold_into_round(self, round_id: int, *, added: int, samples: float, aggregate: bytes | None) -> None:
        """A group's accepted updates: counters up, and the round's new running aggregate (None: the
        round keeps every delta instead, and has no aggregate)."""
        params = {"round_id": round_id, "added": added, "samples": samples}
        if aggregate is None:
            self.conn.execute(FOLD_COUNTS_INTO_ROUND, params)
        else:
            self.conn.execute(FOLD_INTO_ROUND, {**params, "aggregate": aggregate})

    def set_epsilon(self, round_id: int, epsilon: float) -> None:
        self.conn.execute(SET_EPSILON, {"round_id": round_id, "eps": epsilon})

    # ------------------------------------------------------------------ assignments and updates

    def add_assignment(self, round_id: int, device_id: str, assigned_at: float) -> None:
        """Assign the device (already assigned by another replica meanwhile: nothing to do)."""
        params = {"round_id": round_id, "device_id": device_id, "assigned_at": assigned_at}
        self.conn.execute(_add_assignment(self.dialect), params)

    def add_update(self, row: UpdateRow) -> bool:
        """Insert an accepted update; False when its (round, device) or (device, key) already has one."""
        result = self.conn.execute(
            _add_update(self.dialect),
            {
                "round_id": row.round_id,
                "device_id": row.device_id,
                "idempotency_key": row.idempotency_key,
                "sample_count": row.sample_count,
                "norm": row.norm,
                "encoding": row.encoding,
                "metrics": json.dumps(row.metrics),
                "received_at": row.received_at,
                "response": json.dumps(row.response),
                "delta": row.delta,
                "replica": row.replica,
            },
        )
        return result.first() is not None

    # ------------------------------------------------------------------ replicas: locks, partials, blobs

    def own_lifecycle(self) -> None:
        """Serialize with every other replica's round and version changes (store/locks.py)."""
        locks.lifecycle(self.conn)

    def own_round(self, round_id: int) -> None:
        """Exclusive use of the round (its commit or abandonment): waits for acknowledgements in flight."""
        locks.round_exclusive(self.conn, round_id)

    def share_round(self, round_id: int) -> None:
        """Acknowledge uploads to the round alongside other replicas, never during its commit."""
        locks.round_shared(self.conn, round_id)

    def fold_into_partial(
        self, round_id: int, replica: str, *, expected: int | None, added: int, samples: float, aggregate: bytes | None
    ) -> None:
        """A group's accepted updates into this replica's partial of the round: counters up and its new
        running sum (None: a non-streaming round keeps every delta and no sum). `expected` is the
        partial's count as this replica last saw it (None: it has none yet); if the row says
        otherwise, nothing is written and StalePartial is raised."""
        params = {"r": round_id, "rep": replica, "added": added, "samples": samples}
        if expected is None:
            row = {"round_id": round_id, "replica": replica, "received": added, "total_weight": samples}
            done = self.conn.execute(_add_partial(self.dialect), {**row, "aggregate": aggregate})
        else:
            statement = GROW_PARTIAL_COUNTS if aggregate is None else GROW_PARTIAL
            done = self.conn.execute(statement, {**params, "expected": expected, "aggregate": aggregate})
        if done.first() is None:
            raise StalePartial(f"round {round_id}: partial of replica {replica} is not at {expected} updates")

    def merge_partials(self, round_id: int, *, received: int, total_weight: float, aggregate: bytes | None) -> None:
        """Closing a round: its row gets the whole count, weight and sum (None when abandoned or not
        streaming); the partials keep their counts (what each replica acknowledged) but drop their sums."""
        params = {"round_id": round_id, "received": received, "weight": total_weight, "aggregate": aggregate}
        self.conn.execute(SET_ROUND_TOTALS, params)
        self.conn.execute(DROP_PARTIAL_SUMS, {"r": round_id})

    def put_secagg(self, row: SecAggRow) -> None:
        """Write a secure-aggregation round's state at `row.revision`, which must be the stored one + 1
        (or 0 for a new row); otherwise StalePartial (another writer got there first)."""
        values = {
            "phase": row.phase,
            "members": json.dumps(row.members),
            "phase_started": row.phase_started,
            "revision": row.revision,
            "reason": row.reason,
        }
        keep_state = row.state is None and row.has_state  # read without its state, which stays as stored
        if not keep_state:
            values.update(state=row.state, state_revision=row.state_revision)
        if row.revision == 0:
            self.conn.execute(ADD_SECAGG, {"round_id": row.round_id, **values})
            return
        statement = UPDATE_SECAGG_KEEPING_STATE if keep_state else UPDATE_SECAGG
        params = {f"new_{k}": v for k, v in values.items()}
        done = self.conn.execute(statement, {"r": row.round_id, "expected": row.revision - 1, **params})
        if done.rowcount != 1:
            raise StalePartial(f"secure aggregation of round {row.round_id}: revision {row.revision - 1} is gone")

    def add_secagg_message(self, round_id: int, seq: int, kind: str, body: bytes) -> None:
        self.conn.execute(ADD_SECAGG_MESSAGE, {"round_id": round_id, "seq": seq, "kind": kind, "body": body})

    def drop_secagg_messages(self, round_id: int, through: int) -> None:
        """Messages folded into a newer state are not needed any more."""
        self.conn.execute(DROP_SECAGG_MESSAGES, {"r": round_id, "through": through})

    def add_blob(self, name: str, data: bytes) -> None:
        self.conn.execute(ADD_BLOB, {"name": name, "data": data})

    # ------------------------------------------------------------------ releases

    def add_release(self, version: int, action: str, actor: str, reason: str, at: float) -> None:
        params = {"version": version, "action": action, "actor": actor, "reason": reason, "at": at}
        self.conn.execute(ADD_RELEASE, params)

    def add_population(self, name: str, key_hash: str, architecture: str, created_at: float, by: str) -> None:
        row = {"enrollment_key_hash": key_hash, "architecture": architecture, "created_at": created_at}
        self.conn.execute(ADD_POPULATION, {"name": name, **row, "created_by": by})

    # ------------------------------------------------------------------ server state

    def set_state(self, key: str, value: bytes | str) -> None:
        self.conn.execute(_state_statements(self.dialect)[0], {"key": key, "value": value})

    def add_state_if_missing(self, key: str, value: bytes | str) -> None:
        self.conn.execute(_state_statements(self.dialect)[1], {"key": key, "value": value})

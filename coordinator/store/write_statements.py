"""Every write statement, built once at import (writes.py runs them on one open transaction).

Statements are built once at import; SQLAlchemy caches their compiled form. Upserts use the
dialect's own INSERT ... ON CONFLICT DO UPDATE (SQLite and PostgreSQL spell it alike).
"""

from __future__ import annotations

import importlib
from functools import cache

import sqlalchemy as sa

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
def state_statements(dialect: str) -> tuple[sa.Insert, sa.Insert]:
    """(upsert, insert-if-missing) of a server_state row, in the dialect's INSERT ... ON CONFLICT."""
    insert = dialect_insert(dialect)
    upsert = insert(server_state).values(key=_b("key"), value=_b("value"))
    upsert = upsert.on_conflict_do_update(index_elements=[server_state.c.key], set_={"value": upsert.excluded.value})
    return upsert, insert(server_state).on_conflict_do_nothing()


def dialect_insert(dialect: str):
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
    take = dialect_insert(dialect)(leases).values(
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
    hit = dialect_insert(dialect)(rate_limits).values(key=_b("key"), window_start=_b("start"), hits=1)
    return hit.on_conflict_do_update(
        index_elements=[rate_limits.c.key, rate_limits.c.window_start], set_={"hits": rate_limits.c.hits + 1}
    ).returning(rate_limits.c.hits)


@cache
def add_partial(dialect: str) -> sa.Insert:
    """A replica's first fold into a round; nothing if the row exists (then its view was stale)."""
    return dialect_insert(dialect)(round_partials).on_conflict_do_nothing().returning(round_partials.c.received)


@cache
def add_assignment(dialect: str) -> sa.Insert:
    return dialect_insert(dialect)(assignments).on_conflict_do_nothing()


@cache
def add_update(dialect: str) -> sa.Insert:
    """An update's row, or nothing when its (round, device) or (device, key) is already taken: by
    another replica's acknowledgement, committed meanwhile (PostgreSQL waits for it to commit).
    RETURNING says which (the DBAPI's rowcount is not reliable for INSERT on every driver)."""
    return dialect_insert(dialect)(updates).on_conflict_do_nothing().returning(updates.c.round_id)


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
PRUNE_RATE_LIMITS = sa.delete(rate_limits).where(rate_limits.c.window_start < _b("before"))
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

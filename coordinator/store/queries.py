"""Every read the store runs, as SQLAlchemy Core statements built once at import (store.py runs them;
writes.py holds the writes)."""

from __future__ import annotations

import sqlalchemy as sa

from coordinator.store.schema import (
    assignments,
    devices,
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
_count = sa.func.count
RATE_HITS = sa.select(rate_limits.c.hits).where(
    rate_limits.c.key == _b("key"), rate_limits.c.window_start == _b("start")
)
# Statuses as SQL literals, not bound parameters: SQLite re-prepares a statement on every run when a
# bound value decides whether a partial index (one_open_round) applies (measured: 0.3 ms vs 0.03 ms).
OPEN, COMMITTED = sa.literal_column("'open'"), sa.literal_column("'committed'")


def _with_partials(column: sa.Column) -> sa.ColumnElement:
    """An open round's count (or weight) is its row's plus its replicas' partials (the commit merges
    them into the row, so a closed round's row holds the whole of it)."""
    partials = (
        sa.select(sa.func.coalesce(sa.func.sum(round_partials.c[column.name]), sa.literal_column("0")))
        .where(round_partials.c.round_id == rounds.c.id)
        .scalar_subquery()
    )
    return sa.case((rounds.c.status == OPEN, column + partials), else_=column).label(column.name)


ROUND = [  # in RoundRow's field order
    _with_partials(c) if c.name in ("received", "total_weight") else c for c in rounds.c if c.name != "aggregate"
]
VERSION = list(model_versions.c)
UPDATE = [c for c in updates.c if c.name != "delta"]  # UpdateRow.from_row's order: ..., response, replica
PARTIAL = [
    round_partials.c.round_id,
    round_partials.c.replica,
    round_partials.c.received,
    round_partials.c.total_weight,
]

DEVICE_BY_TOKEN = sa.select(devices.c.id, devices.c.name, devices.c.created_at, devices.c.last_seen).where(
    devices.c.token_hash == _b("token_hash")
)
DEVICE_ACTIVITY = sa.select(
    devices.c.created_at,
    sa.select(_count()).where(assignments.c.device_id == _b("d")).scalar_subquery(),
    sa.select(_count()).where(updates.c.device_id == _b("d")).scalar_subquery(),
).where(devices.c.id == _b("d"))
COUNT_DEVICES = sa.select(_count()).select_from(devices)
COUNT_ACTIVE_DEVICES = sa.select(_count()).where(devices.c.last_seen >= _b("since"))
DEVICE_TOKENS = sa.select(devices.c.id, devices.c.token_hash)

LATEST_VERSION = sa.select(sa.func.max(model_versions.c.version))
VERSION_BY_NUMBER = sa.select(*VERSION).where(model_versions.c.version == _b("v"))
VERSIONS_NEWEST_FIRST = sa.select(*VERSION).order_by(model_versions.c.version.desc()).limit(_b("limit"))
ALL_VERSIONS = sa.select(*VERSION).order_by(model_versions.c.version)
VERSION_FILENAMES = sa.select(model_versions.c.filename)
UNEVALUATED = sa.select(model_versions.c.version).where(model_versions.c.accuracy.is_(None)).order_by("version")
LATEST_ACCURACY = (
    sa.select(model_versions.c.accuracy)
    .where(model_versions.c.accuracy.is_not(None))
    .order_by(model_versions.c.version.desc())
    .limit(1)
)

OPEN_ROUND = sa.select(*ROUND).where(rounds.c.status == OPEN).order_by(rounds.c.id.desc()).limit(1)
ROUND_BY_ID = sa.select(*ROUND).where(rounds.c.id == _b("id"))
ROUND_WITH_AGGREGATE = sa.select(*ROUND, rounds.c.aggregate).where(rounds.c.id == _b("id"))
ALL_ROUNDS_WITH_AGGREGATE = sa.select(*ROUND, rounds.c.aggregate).order_by(rounds.c.id)
RECENT_ROUNDS = sa.select(*ROUND).order_by(rounds.c.id.desc()).limit(_b("limit"))
LAST_COMMITTED_BEFORE = (
    sa.select(sa.func.max(rounds.c.id)).where(rounds.c.id < _b("r")).where(rounds.c.status == COMMITTED)
)
ROUNDS_BY_STATUS = sa.select(rounds.c.status, _count()).group_by(rounds.c.status)
DP_EVENTS = (
    sa.select(rounds.c.dp_q, rounds.c.dp_noise)
    .where(rounds.c.status == COMMITTED, rounds.c.dp_q.is_not(None))
    .order_by(rounds.c.id)
)
LAST_EPSILON = (
    sa.select(rounds.c.epsilon, rounds.c.dp_clip)
    .where(rounds.c.epsilon.is_not(None))
    .order_by(rounds.c.id.desc())
    .limit(1)
)

IS_ASSIGNED = sa.select(1).where(assignments.c.round_id == _b("r"), assignments.c.device_id == _b("d"))
COUNT_ASSIGNED = sa.select(_count()).where(assignments.c.round_id == _b("r"))
ASSIGNED_PER_ROUND = (
    sa.select(assignments.c.round_id, _count())
    .where(assignments.c.round_id.between(_b("lo"), _b("hi")))
    .group_by(assignments.c.round_id)
)

ANSWER_FOR_KEY = sa.select(updates.c.response).where(
    updates.c.device_id == _b("d"), updates.c.idempotency_key == _b("k")
)
HAS_UPDATE = sa.select(1).where(updates.c.round_id == _b("r"), updates.c.device_id == _b("d"))
ROUND_UPDATES = sa.select(*UPDATE).where(updates.c.round_id == _b("r")).order_by(updates.c.received_at)
ROUND_DELTAS = sa.select(updates.c.delta, updates.c.sample_count).where(updates.c.round_id == _b("r"))
ROUND_NORMS = sa.select(updates.c.norm).where(updates.c.round_id == _b("r"))
COUNT_UPDATES = sa.select(_count()).select_from(updates)
UPDATES_BY_ACCEPTANCE = {  # SQLite: rowid, the insertion order; PostgreSQL: arrival time
    "sqlite": sa.select(*UPDATE).order_by(sa.literal_column("rowid")),
    "postgresql": sa.select(*UPDATE).order_by(updates.c.received_at),
}

PARTIAL_COUNT = sa.select(round_partials.c.received).where(
    round_partials.c.round_id == _b("r"), round_partials.c.replica == _b("replica")
)
PARTIAL_AGGREGATE = sa.select(round_partials.c.aggregate).where(
    round_partials.c.round_id == _b("r"), round_partials.c.replica == _b("replica")
)
ROUND_PARTIALS = sa.select(*PARTIAL).where(round_partials.c.round_id == _b("r")).order_by(round_partials.c.replica)
ROUND_PARTIALS_WITH_SUMS = (
    sa.select(*PARTIAL, round_partials.c.aggregate)
    .where(round_partials.c.round_id == _b("r"))
    .order_by(round_partials.c.replica)
)
ALL_PARTIALS = sa.select(*PARTIAL).order_by(round_partials.c.round_id, round_partials.c.replica)
MODEL_BLOB = sa.select(model_blobs.c.data).where(model_blobs.c.name == _b("name"))
BLOB_NAMES = sa.select(model_blobs.c.name)

_SECAGG_HAS_STATE = secagg_rounds.c.state.is_not(None)
SECAGG = sa.select(*[c if c.name != "state" else sa.null() for c in secagg_rounds.c], _SECAGG_HAS_STATE).where(
    secagg_rounds.c.round_id == _b("r")
)
SECAGG_WITH_STATE = sa.select(*secagg_rounds.c, _SECAGG_HAS_STATE).where(secagg_rounds.c.round_id == _b("r"))
SECAGG_MESSAGES = (
    sa.select(secagg_messages.c.seq, secagg_messages.c.kind, secagg_messages.c.body)
    .where(secagg_messages.c.round_id == _b("r"), secagg_messages.c.seq > _b("after"))
    .order_by(secagg_messages.c.seq)
)
SECAGG_PHASE = sa.select(secagg_rounds.c.phase, secagg_rounds.c.reason).where(secagg_rounds.c.round_id == _b("r"))

RELEASES_NEWEST_FIRST = sa.select(*releases.c).order_by(releases.c.id.desc()).limit(_b("limit"))
DECIDED_VERSIONS = sa.select(releases.c.version).distinct()
ROUNDS_ON_BASE = (
    sa.select(rounds.c.id)
    .where(rounds.c.base_version == _b("v"), rounds.c.status == COMMITTED, rounds.c.canary == 0)
    .order_by(rounds.c.id.desc())
    .limit(_b("limit"))
)
UPDATE_METRICS = sa.select(updates.c.metrics, updates.c.sample_count).where(updates.c.round_id == _b("r"))

POPULATIONS = sa.select(*populations.c).order_by(populations.c.name)

STATE = sa.select(server_state.c.value).where(server_state.c.key == _b("key"))
STATE_ITEMS = sa.select(server_state.c.key, server_state.c.value).order_by(server_state.c.key)

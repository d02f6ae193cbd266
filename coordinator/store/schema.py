"""The tables, defined once for SQLite and PostgreSQL (SQLAlchemy Core; migrations/ creates them).

On SQLite the column types render exactly as the pre-migration schema wrote them (TEXT, REAL,
INTEGER, BLOB), so a database made by earlier versions and one made now are the same.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

# a float64 everywhere: REAL on SQLite (8 bytes there), DOUBLE PRECISION on PostgreSQL (REAL is 4 bytes)
Real = sa.Double().with_variant(sqlite.REAL(), "sqlite")
# a 64-bit integer where a count or a size may pass 2**31 (INTEGER on SQLite is 64-bit already)
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class StateValue(sa.TypeDecorator):
    """server_state values: bytes. Text written by earlier versions ('1', a seed) reads back as UTF-8."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.encode() if isinstance(value, str) else value

    def process_result_value(self, value, dialect):
        return value.encode() if isinstance(value, str) else value


metadata = sa.MetaData()

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("token_hash", sa.Text, nullable=False, unique=True),  # sha256 of the bearer token, never the token
    sa.Column("name", sa.Text),
    sa.Column("created_at", Real, nullable=False),
    sa.Column("last_seen", Real),  # last check-in (kept to the minute: see service/checkin.py)
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("filename", sa.Text, nullable=False),  # relative to the models directory
    sa.Column("architecture", sa.Text, nullable=False),
    sa.Column("size_bytes", BigInt, nullable=False),
    sa.Column("num_parameters", BigInt, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("round_id", sa.Integer),  # the round that produced it (NULL for published models)
    sa.Column("accuracy", Real),  # server-side evaluation, filled in after publication
    sa.Column("eval_loss", Real),
    sa.Column("eval_n", sa.Integer),
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("base_version", sa.Integer, sa.ForeignKey("model_versions.version"), nullable=False),
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('open', 'committed', 'abandoned')"), nullable=False),
    sa.Column("config", sa.Text, nullable=False),  # JSON snapshot of RoundSettings at opening
    sa.Column("goal", sa.Integer, nullable=False),
    sa.Column("max_assignments", sa.Integer, nullable=False),
    sa.Column("min_updates", sa.Integer, nullable=False),
    sa.Column("opened_at", Real, nullable=False),
    sa.Column("deadline", Real, nullable=False),
    sa.Column("closed_at", Real),
    sa.Column("reason", sa.Text),
    sa.Column("received", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("total_weight", Real, nullable=False, server_default=sa.text("0")),
    sa.Column("aggregate", sa.LargeBinary),  # container: running weighted sum of deltas (float64)
    sa.Column("result_version", sa.Integer),
    sa.Column("dp_clip", Real),  # DP: clip norm C used by this round (NULL: DP off)
    sa.Column("dp_q", Real),  # DP: sampling rate goal / population
    sa.Column("dp_noise", Real),  # DP: noise multiplier z charged to the accountant
    sa.Column("epsilon", Real),  # DP: epsilon spent after this round committed
    # a canary round (service/releases.py): on a candidate, for the canary devices only
    sa.Column("canary", sa.Integer, nullable=False, server_default=sa.text("0")),
    # at most one open round, whichever replica opens it
    sa.Index(
        "one_open_round",
        "status",
        unique=True,
        sqlite_where=sa.text("status = 'open'"),
        postgresql_where=sa.text("status = 'open'"),
    ),
)

assignments = sa.Table(
    "assignments",
    metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("assigned_at", Real, nullable=False),
)

updates = sa.Table(
    "updates",
    metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("sample_count", BigInt, nullable=False),
    sa.Column("norm", Real, nullable=False),
    sa.Column("encoding", sa.Text, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON
    sa.Column("received_at", Real, nullable=False),
    sa.Column("response", sa.Text, nullable=False),  # JSON answer replayed for the same Idempotency-Key
    sa.Column("delta", sa.LargeBinary),  # kept only for non-streaming (robust) strategies
    sa.Column("replica", sa.Text),  # the coordinator replica that acknowledged it (NULL: before replicas)
    sa.UniqueConstraint("device_id", "idempotency_key"),
)

server_state = sa.Table(
    "server_state",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", StateValue, nullable=False),
)

# ---------------------------------------------------------------------- replicas (issue 14)

# Hierarchical aggregation: each replica folds the updates it acknowledges into its own row, in the
# acknowledging transaction; the round's total is the rounds row plus its partials while it is open,
# and the commit (or abandonment) merges them into the rounds row and drops the partials' sums.
round_partials = sa.Table(
    "round_partials",
    metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
    sa.Column("replica", sa.Text, primary_key=True),
    sa.Column("received", sa.Integer, nullable=False),  # kept after the merge: what this replica acknowledged
    sa.Column("total_weight", Real, nullable=False),
    sa.Column("aggregate", sa.LargeBinary),  # running sum (streaming strategies) while the round is open
)

# Model files in the database (PostgreSQL: every replica reads the same ones; store/blobs.py).
model_blobs = sa.Table(
    "model_blobs",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),  # model_versions.filename
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# Who does the background work (deadlines, evaluation): a lease with an expiry, renewed by its holder.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires_at", Real, nullable=False),  # the database server's clock (seconds since the epoch)
)

# Rate-limit counters shared by every replica: hits per key and fixed window, bumped atomically.
rate_limits = sa.Table(
    "rate_limits",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("window_start", BigInt, primary_key=True),
    sa.Column("hits", sa.Integer, nullable=False),
)

# One-time enrollment codes (POST /v1/admin/enrollment-codes): sha256 of the code, spent once.
enrollment_codes = sa.Table(
    "enrollment_codes",
    metadata,
    sa.Column("code_hash", sa.Text, primary_key=True),
    sa.Column("created_at", Real, nullable=False),
    sa.Column("expires_at", Real, nullable=False),
    sa.Column("used_at", Real),  # NULL until a device enrolls with it
    sa.Column("device_id", sa.Text),  # the device that spent it
)

# ---------------------------------------------------------------------- secure aggregation (issue 13)

# One row per secure-aggregation round: the cohort (device ids; index = position + 1), the phase and
# the server session's state at the start of the phase (protocol/secagg ServerSession.to_bytes); the
# messages accepted since are in secagg_messages, each written in the transaction that accepts it, so
# a restarted coordinator rebuilds the session (state + messages) and resumes where it stopped.
secagg_rounds = sa.Table(
    "secagg_rounds",
    metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
    sa.Column("phase", sa.Text, nullable=False),  # joining, advertise, share_keys, masked_input, unmask, done|abandoned
    sa.Column("members", sa.Text, nullable=False),  # JSON list of device ids in index order
    sa.Column("phase_started", Real, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),  # bumped by every write (caches compare it)
    sa.Column("state", sa.LargeBinary),  # ServerSession.to_bytes() at state_revision; NULL while the cohort forms
    sa.Column("state_revision", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("reason", sa.Text),  # why it was abandoned
)

# The messages a secure-aggregation round accepted since its last state (replayed in seq order).
secagg_messages = sa.Table(
    "secagg_messages",
    metadata,
    sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),  # the round's revision that accepted it
    sa.Column("kind", sa.Text, nullable=False),  # advertise, shares, masked_input, unmask
    sa.Column("body", sa.LargeBinary, nullable=False),  # the JSON message, or the masked-input frame
)

# ---------------------------------------------------------------------- releases (issue 17)

# Every change of which version devices get as their base, with who made it and why: the gate's
# decisions on candidates, canaries, promotions, an operator's pins and rollbacks. The current state
# (released version, canary, pin) is server_state "release", written in the same transaction.
releases = sa.Table(
    "releases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.Integer, sa.ForeignKey("model_versions.version"), nullable=False),
    sa.Column("action", sa.Text, nullable=False),  # released | held | canary | promoted | pinned | ...
    sa.Column("actor", sa.Text, nullable=False),  # "release-gate", "system" or the operator's name
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("at", Real, nullable=False),
    sa.Index("releases_by_version", "version"),
)

# ---------------------------------------------------------------------- populations (issue 17)

# The named populations besides `default` (the coordinator's own database). Each one's devices,
# rounds, versions and releases live in a database of its own (a SQLite file beside this one, or a
# PostgreSQL schema: service/populations.py), so no query of one population can reach another's rows.
populations = sa.Table(
    "populations",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("enrollment_key_hash", sa.Text, nullable=False),  # sha256 of its enrollment key
    sa.Column("architecture", sa.Text, nullable=False),
    sa.Column("created_at", Real, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
)

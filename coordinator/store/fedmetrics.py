"""Federated metrics: what devices measured on their own held-out data for a model version (the
evaluate and personalize tasks), one row per device, version and kind, and their per-version means.

Kept beside the core tables (same metadata, its own Alembic revision 0003) so the statements that
read and write it live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from coordinator.store.schema import Real, metadata
from coordinator.store.store import Store
from coordinator.store.write_statements import dialect_insert

_b = sa.bindparam

federated_metrics = sa.Table(
    "federated_metrics",
    metadata,
    sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.Text, primary_key=True),  # "evaluate" or "personalize"
    sa.Column("global_accuracy", Real, nullable=False),
    sa.Column("personal_accuracy", Real, nullable=False),
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("global_loss", Real),
    sa.Column("personal_loss", Real),
    sa.Column("reported_at", Real, nullable=False),
    sa.Index("federated_metrics_by_version", "version"),
)

_fm = federated_metrics.c
_weight = sa.func.sum(_fm.samples)
BY_VERSION = (
    sa.select(
        _fm.version,
        sa.func.count(sa.distinct(_fm.device_id)),
        _weight,
        sa.func.sum(_fm.global_accuracy * _fm.samples) / _weight,
        sa.func.sum(_fm.personal_accuracy * _fm.samples) / _weight,
    )
    .group_by(_fm.version)
    .order_by(_fm.version.desc())
)
HAS_REPORTED = sa.select(sa.literal(1)).where(
    (_fm.device_id == _b("d")) & (_fm.version == _b("v")) & (_fm.kind == _b("k"))
)


@dataclass(frozen=True)
class VersionMetrics:
    """The devices' view of one version: sample-weighted means over their held-out data."""

    version: int
    devices: int
    samples: int
    global_accuracy: float
    personal_accuracy: float

    @property
    def lift(self) -> float:
        """Personalization lift: what the personal layers add on the devices' own data."""
        return self.personal_accuracy - self.global_accuracy


BY_VERSION_SINCE = BY_VERSION.where(_fm.version >= _b("since"))


def per_version(store: Store, limit: int | None = None, since: int | None = None) -> list[VersionMetrics]:
    """Newest version first (the newest `limit`, or those from `since` on); each device's report of each
    kind counts once."""
    statement = BY_VERSION if since is None else BY_VERSION_SINCE
    rows = store.db.fetch(
        statement if limit is None else statement.limit(limit), {"since": since} if since is not None else None
    )
    return [VersionMetrics(int(v), int(d), int(n), float(g), float(p)) for v, d, n, g, p in rows]


def has_reported(store: Store, device_id: str, version: int, kind: str) -> bool:
    return bool(store.db.fetch(HAS_REPORTED, {"d": device_id, "v": version, "k": kind}))


def record(store: Store, device_id: str, row: dict, now: float) -> None:
    """Store a device's report (a repeated report of the same version and kind replaces the earlier one)."""
    insert = dialect_insert(store.dialect)(federated_metrics).values(device_id=device_id, reported_at=now, **row)
    keep = {k: insert.excluded[k] for k in (*row, "reported_at") if k not in ("version", "kind")}
    statement = insert.on_conflict_do_update(index_elements=[_fm.device_id, _fm.version, _fm.kind], set_=keep)
    with store.transaction() as tx:
        tx.conn.execute(statement)

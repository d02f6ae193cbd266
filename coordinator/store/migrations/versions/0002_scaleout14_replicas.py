"""Coordinator replicas on one database: per-replica partial aggregates, model files as database
blobs, the background-work lease, shared rate-limit counters, which replica acknowledged each update,
and at most one open round.

Revision ID: 0002_scaleout14
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import BigInt, Real

revision = "0002_scaleout14"
down_revision = "0001"
branch_labels = None
depends_on = None

OPEN = sa.text("status = 'open'")


def upgrade() -> None:
    op.create_table(
        "round_partials",
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("replica", sa.Text, primary_key=True),
        sa.Column("received", sa.Integer, nullable=False),
        sa.Column("total_weight", Real, nullable=False),
        sa.Column("aggregate", sa.LargeBinary),
    )
    op.create_table(
        "model_blobs",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires_at", Real, nullable=False),
    )
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("window_start", BigInt, primary_key=True),
        sa.Column("hits", sa.Integer, nullable=False),
    )
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("replica", sa.Text))
    op.create_index("one_open_round", "rounds", ["status"], unique=True, sqlite_where=OPEN, postgresql_where=OPEN)
    if op.get_bind().dialect.name == "postgresql":  # float sums and weights do not compress: do not try
        for table, column in (("round_partials", "aggregate"), ("rounds", "aggregate"), ("model_blobs", "data")):
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_index("one_open_round", "rounds")
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("replica")
    for table in ("rate_limits", "leases", "model_blobs", "round_partials"):
        op.drop_table(table)

"""Secure aggregation: the durable per-phase state of each secure-aggregation round.

Revision ID: 0003_secagg13
Revises: 0002_scaleout14
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import Real

revision = "0003_secagg13"
down_revision = "0002_scaleout14"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secagg_rounds",
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("phase", sa.Text, nullable=False),
        sa.Column("members", sa.Text, nullable=False),
        sa.Column("phase_started", Real, nullable=False),
        sa.Column("revision", sa.Integer, nullable=False),
        sa.Column("state", sa.LargeBinary),
        sa.Column("reason", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("secagg_rounds")

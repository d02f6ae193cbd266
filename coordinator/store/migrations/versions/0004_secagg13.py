"""Secure aggregation: each secure-aggregation round's state at the start of its phase, and the
messages accepted since.

Revision ID: 0004_secagg13
Revises: 0003_security12
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import Real

revision = "0004_secagg13"
down_revision = "0003_security12"
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
        sa.Column("state_revision", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("reason", sa.Text),
    )
    op.create_table(
        "secagg_messages",
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":  # masked vectors and session states do not compress
        for table, column in (("secagg_rounds", "state"), ("secagg_messages", "body")):
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_table("secagg_messages")
    op.drop_table("secagg_rounds")

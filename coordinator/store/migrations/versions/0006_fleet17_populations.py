"""Several populations (issue 17): the registry of named populations.

Revision ID: 0006_fleet17_populations
Revises: 0005_fleet17_releases
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import Real

revision = "0006_fleet17_populations"
down_revision = "0005_fleet17_releases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "populations",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("enrollment_key_hash", sa.Text, nullable=False),
        sa.Column("architecture", sa.Text, nullable=False),
        sa.Column("created_at", Real, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("populations")

"""Safe releases (issue 17): the audit of every change of the released version; canary rounds.

Revision ID: 0005_fleet17_releases
Revises: 0004_secagg13
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import Real

revision = "0005_fleet17_releases"
down_revision = "0004_secagg13"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "releases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.Integer, sa.ForeignKey("model_versions.version"), nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", Real, nullable=False),
    )
    op.create_index("releases_by_version", "releases", ["version"])
    # a plain ADD COLUMN (SQLite's batch mode would rebuild the table and drop its CHECK constraint)
    op.add_column("rounds", sa.Column("canary", sa.Integer, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("canary")
    op.drop_index("releases_by_version", "releases")
    op.drop_table("releases")

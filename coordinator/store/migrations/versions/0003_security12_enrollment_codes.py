"""One-time enrollment codes minted by the operator (stored as sha256, never the code).

Revision ID: 0003_security12
Revises: 0002_scaleout14
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import Real

revision = "0003_security12"
down_revision = "0002_scaleout14"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "enrollment_codes",
        sa.Column("code_hash", sa.Text, primary_key=True),
        sa.Column("created_at", Real, nullable=False),
        sa.Column("expires_at", Real, nullable=False),
        sa.Column("used_at", Real),
        sa.Column("device_id", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("enrollment_codes")

"""Federated metrics (issue 17): per device, version and task kind, the accuracy of the global and
of the personal model on the device's held-out data.

Revision ID: 0007_issue17_fedmetrics
Revises: 0006_fleet17_populations
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import Real

revision = "0007_issue17_fedmetrics"
down_revision = "0006_fleet17_populations"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "federated_metrics",
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("kind", sa.Text, primary_key=True),
        sa.Column("global_accuracy", Real, nullable=False),
        sa.Column("personal_accuracy", Real, nullable=False),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("global_loss", Real),
        sa.Column("personal_loss", Real),
        sa.Column("reported_at", Real, nullable=False),
    )
    op.create_index("federated_metrics_by_version", "federated_metrics", ["version"])


def downgrade() -> None:
    op.drop_index("federated_metrics_by_version", "federated_metrics")
    op.drop_table("federated_metrics")

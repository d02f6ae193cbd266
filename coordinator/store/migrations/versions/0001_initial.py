"""The schema as it stood before migrations (server_state schema_version 2): a database made by
those versions is stamped with this revision as it is (coordinator/store/migrate.py).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from coordinator.store.schema import BigInt, Real, StateValue

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("token_hash", sa.Text, nullable=False, unique=True),
        sa.Column("name", sa.Text),
        sa.Column("created_at", Real, nullable=False),
        sa.Column("last_seen", Real),
    )
    op.create_table(
        "model_versions",
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("filename", sa.Text, nullable=False),
        sa.Column("architecture", sa.Text, nullable=False),
        sa.Column("size_bytes", BigInt, nullable=False),
        sa.Column("num_parameters", BigInt, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("round_id", sa.Integer),
        sa.Column("accuracy", Real),
        sa.Column("eval_loss", Real),
        sa.Column("eval_n", sa.Integer),
    )
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("base_version", sa.Integer, sa.ForeignKey("model_versions.version"), nullable=False),
        sa.Column(
            "status", sa.Text, sa.CheckConstraint("status IN ('open', 'committed', 'abandoned')"), nullable=False
        ),
        sa.Column("config", sa.Text, nullable=False),
        sa.Column("goal", sa.Integer, nullable=False),
        sa.Column("max_assignments", sa.Integer, nullable=False),
        sa.Column("min_updates", sa.Integer, nullable=False),
        sa.Column("opened_at", Real, nullable=False),
        sa.Column("deadline", Real, nullable=False),
        sa.Column("closed_at", Real),
        sa.Column("reason", sa.Text),
        sa.Column("received", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("total_weight", Real, nullable=False, server_default=sa.text("0")),
        sa.Column("aggregate", sa.LargeBinary),
        sa.Column("result_version", sa.Integer),
        sa.Column("dp_clip", Real),
        sa.Column("dp_q", Real),
        sa.Column("dp_noise", Real),
        sa.Column("epsilon", Real),
    )
    op.create_table(
        "assignments",
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("assigned_at", Real, nullable=False),
    )
    op.create_table(
        "updates",
        sa.Column("round_id", sa.Integer, sa.ForeignKey("rounds.id"), primary_key=True),
        sa.Column("device_id", sa.Text, sa.ForeignKey("devices.id"), primary_key=True),
        sa.Column("idempotency_key", sa.Text, nullable=False),
        sa.Column("sample_count", BigInt, nullable=False),
        sa.Column("norm", Real, nullable=False),
        sa.Column("encoding", sa.Text, nullable=False),
        sa.Column("metrics", sa.Text, nullable=False),
        sa.Column("received_at", Real, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("delta", sa.LargeBinary),
        sa.UniqueConstraint("device_id", "idempotency_key"),
    )
    op.create_table(
        "server_state",
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", StateValue, nullable=False),
    )


def downgrade() -> None:
    for table in ("server_state", "updates", "assignments", "rounds", "model_versions", "devices"):
        op.drop_table(table)

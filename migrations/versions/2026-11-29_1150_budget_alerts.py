"""budget alerts: the outbox of SPEC 8 alerts, one per period and kind

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 11:50:11.134765

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "budget_alerts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("budget_id", sa.String(length=40), nullable=False),
        sa.Column("period_id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name=op.f("fk_budget_alerts_budget_id_budgets")
        ),
        sa.ForeignKeyConstraint(
            ["period_id"],
            ["budget_periods.id"],
            name=op.f("fk_budget_alerts_period_id_budget_periods"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_alerts")),
        sa.UniqueConstraint("period_id", "kind", name=op.f("uq_budget_alerts_period_id")),
    )
    with op.batch_alter_table("budget_alerts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_budget_alerts_next_attempt_at"), ["next_attempt_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("budget_alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_alerts_next_attempt_at"))

    op.drop_table("budget_alerts")

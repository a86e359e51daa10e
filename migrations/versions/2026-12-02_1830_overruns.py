"""overruns: the excess of a request's cost over its reservation on its ledger entry, and
overrun alerts (one per request, so the alert outbox is unique per period, kind and request)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 18:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("overrun", sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        )
        batch_op.create_index(
            "ix_ledger_entries_overrun_finished",
            ["finished_at"],
            unique=False,
            sqlite_where=sa.text("overrun > 0"),
            postgresql_where=sa.text("overrun > 0"),
        )
    with op.batch_alter_table("budget_alerts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("request_id", sa.String(length=64), server_default="", nullable=False)
        )
        batch_op.drop_constraint("uq_budget_alerts_period_id", type_="unique")
        batch_op.create_unique_constraint(
            "uq_budget_alerts_period_id", ["period_id", "kind", "request_id"]
        )


def downgrade() -> None:
    # Overrun alerts do not fit the one-per-(period, kind) outbox: they go with their column.
    op.execute("DELETE FROM budget_alerts WHERE kind = 'overrun'")
    with op.batch_alter_table("budget_alerts", schema=None) as batch_op:
        batch_op.drop_constraint("uq_budget_alerts_period_id", type_="unique")
        batch_op.create_unique_constraint("uq_budget_alerts_period_id", ["period_id", "kind"])
        batch_op.drop_column("request_id")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_overrun_finished")
        batch_op.drop_column("overrun")

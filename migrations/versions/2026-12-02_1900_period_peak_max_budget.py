"""period peak max_budget: the highest limit a period admitted under, which `reconcile` holds
its spend to (with the overruns recorded in it)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 19:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("budget_periods", schema=None) as batch_op:
        batch_op.add_column(sa.Column("peak_max_budget", sa.BigInteger(), nullable=True))
    # Earlier limit changes were not recorded: the current limit stands for the peak (a period
    # whose limit was lowered under its spend before this migration is reported by reconcile).
    op.execute("UPDATE budget_periods SET peak_max_budget = max_budget")


def downgrade() -> None:
    with op.batch_alter_table("budget_periods", schema=None) as batch_op:
        batch_op.drop_column("peak_max_budget")

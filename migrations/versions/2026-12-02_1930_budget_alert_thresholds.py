"""budget alert thresholds: `alert_at` per budget, in basis points of max_budget (the outbox
records one alert per period and threshold, its kind naming the threshold)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 19:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alert_at_bp", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    # Threshold alerts already in the outbox keep their payload: they are delivered as they are.
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_column("alert_at_bp")

"""usage rollup: the ledger summed per UTC day, key and model for finished days (usage_daily),
and the days already rolled up (usage_rollup_days), so the dashboard never scans the ledger

Revision ID: 0008_usage_daily
Revises: 0007
Create Date: 2026-12-02 21:15:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_usage_daily"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("rejections", sa.BigInteger(), nullable=False),
        sa.Column("overruns", sa.BigInteger(), nullable=False),
        sa.Column("spend", sa.BigInteger(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "key_id", "model", name=op.f("pk_usage_daily")),
    )
    op.create_index("ix_usage_daily_key_day", "usage_daily", ["key_id", "day"], unique=False)
    op.create_table(
        "usage_rollup_days",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("rolled_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_usage_rollup_days")),
    )


def downgrade() -> None:
    # The rollup is derived from the ledger: nothing is lost, the next upgrade rolls it again.
    op.drop_table("usage_rollup_days")
    op.drop_index("ix_usage_daily_key_day", table_name="usage_daily")
    op.drop_table("usage_daily")

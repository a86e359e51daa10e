"""usage rollup: the ledger summed per UTC day and key (usage_daily_by_key) and per UTC day and
model (usage_daily_by_model) for finished days, and the days rolled up (usage_rollup_days), so
that the dashboard never scans the ledger

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 21:40:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _measures() -> list[sa.Column]:
    return [
        sa.Column(name, sa.BigInteger(), nullable=False)
        for name in (
            "requests",
            "rejections",
            "overruns",
            "spend",
            "prompt_tokens",
            "completion_tokens",
        )
    ]


def upgrade() -> None:
    op.create_table(
        "usage_daily_by_key",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        *_measures(),
        sa.PrimaryKeyConstraint("day", "key_id", name=op.f("pk_usage_daily_by_key")),
    )
    op.create_index(
        "ix_usage_daily_by_key_key_day", "usage_daily_by_key", ["key_id", "day"], unique=False
    )
    op.create_table(
        "usage_daily_by_model",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        *_measures(),
        sa.PrimaryKeyConstraint("day", "model", name=op.f("pk_usage_daily_by_model")),
    )
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
    op.drop_table("usage_daily_by_model")
    op.drop_index("ix_usage_daily_by_key_key_day", table_name="usage_daily_by_key")
    op.drop_table("usage_daily_by_key")

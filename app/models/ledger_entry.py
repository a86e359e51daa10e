from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, Nanos, UTCDateTime


class LedgerEntry(Base):
    """The one record of a request that reached the budget check. Keyed by the gateway's own
    request id, so no request can be recorded (or charged) twice.

    Two phases, like a ledger's pending transfer: admission writes the entry as `pending`
    (cost 0; `finished_at` is then the time by which it must settle, after which the sweeper
    records it `abandoned`) with its charges holding the reservation; settlement turns it into
    its outcome and cost in place. No row is deleted per request: a table that every request
    inserts into and deletes from again leaves PostgreSQL dead space that later statements
    walk through (bench/RESULTS.md, the soak)."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        Index("ix_ledger_entries_key_finished", "key_id", "finished_at"),
        Index("ix_ledger_entries_finished", "finished_at"),
        # The alerts pass looks for recent overruns: few, so a small partial index.
        Index(
            "ix_ledger_entries_overrun_finished",
            "finished_at",
            sqlite_where=text("overrun > 0"),
            postgresql_where=text("overrun > 0"),
        ),
        # The sweeper looks for pending entries past their time: only requests in flight.
        Index(
            "ix_ledger_entries_pending",
            "finished_at",
            sqlite_where=text("outcome = 'pending'"),
            postgresql_where=text("outcome = 'pending'"),
        ),
        # An owner's latest entries (the dashboard's owner pages): only entries made for one.
        *(
            Index(
                f"ix_ledger_entries_{column}_finished",
                column,
                "finished_at",
                sqlite_where=text(f"{column} IS NOT NULL"),
                postgresql_where=text(f"{column} IS NOT NULL"),
            )
            for column in ("team_id", "user_id", "end_user_id")
        ),
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    # Who else the request was made for (SPEC 11), as of its admission: the key's team and
    # user, the end user it named, the tags it carried.
    team_id: Mapped[str | None] = mapped_column(String(40))
    user_id: Mapped[str | None] = mapped_column(String(40))
    end_user_id: Mapped[str | None] = mapped_column(String(40))
    tags: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    model: Mapped[str | None] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(255))
    stream: Mapped[bool] = mapped_column(Boolean)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[int] = mapped_column(Nanos)
    # What the cost exceeded the request's reservation by (SPEC 10); 0 when it fit.
    overrun: Mapped[int] = mapped_column(Nanos, default=0, server_default=text("0"))
    cost_source: Mapped[str] = mapped_column(
        String(16)
    )  # upstream|prices|estimated|free|reservation|none
    # pending (in flight) | ok | rejected | upstream_error | client_disconnect | timeout |
    # abandoned
    outcome: Mapped[str] = mapped_column(String(24))
    status_code: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime)


class LedgerCharge(Base):
    """Which periods a ledger entry was charged to, and how much (one row per budget). While
    the entry is pending: what it holds there (its reservation)."""

    __tablename__ = "ledger_charges"

    request_id: Mapped[str] = mapped_column(
        ForeignKey("ledger_entries.request_id"), primary_key=True
    )
    period_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("budget_periods.id"), primary_key=True, index=True
    )
    amount: Mapped[int] = mapped_column(Nanos)

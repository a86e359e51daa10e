from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import AutoId, Base, Nanos, UTCDateTime


class BudgetPeriod(Base):
    """One window of a budget. Spend and reservations live here and nowhere else.

    `max_budget` is the budget's limit, copied in when the period opens and updated together
    with the budget while the period is open, so that admission is one single-row UPDATE and
    closed periods keep the limit they were held to.
    """

    __tablename__ = "budget_periods"
    __table_args__ = (
        # Exactly one open period per budget, enforced by the database.
        Index(
            "uq_budget_periods_one_open",
            "budget_id",
            unique=True,
            sqlite_where=text("closed_at IS NULL"),
            postgresql_where=text("closed_at IS NULL"),
        ),
        Index("ix_budget_periods_budget_start", "budget_id", "period_start"),
        Index(
            "ix_budget_periods_open_end", "period_end", postgresql_where=text("closed_at IS NULL")
        ),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    budget_id: Mapped[str] = mapped_column(ForeignKey("budgets.id"))
    period_start: Mapped[datetime] = mapped_column(UTCDateTime)
    period_end: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: lifetime
    max_budget: Mapped[int | None] = mapped_column(Nanos)
    # The highest max_budget the period admitted under (None: unlimited at some time): what
    # `reconcile` holds its spend to, so that a limit lowered mid-period is no broken invariant.
    peak_max_budget: Mapped[int | None] = mapped_column(Nanos)
    spend: Mapped[int] = mapped_column(Nanos, default=0)
    reserved: Mapped[int] = mapped_column(Nanos, default=0)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    close_reason: Mapped[str | None] = mapped_column(String(32))  # expired | manual

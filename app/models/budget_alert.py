from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, UTCDateTime


class BudgetAlert(Base):
    """A budget alert (SPEC 8) and its delivery to the webhook: an outbox row.

    One row per (period, kind, request id), enforced by the database: however many replicas
    notice the crossing, a period's soft-budget and exhausted alerts (request id "") exist once
    per period per budget, the next period re-arming them, and so does each alert threshold (its
    kind names it: `threshold:8000` for 80 %); an overrun alert exists once per request per
    period it was charged to."""

    __tablename__ = "budget_alerts"
    __table_args__ = (UniqueConstraint("period_id", "kind", "request_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    budget_id: Mapped[str] = mapped_column(String(40), ForeignKey("budgets.id"))
    period_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("budget_periods.id"))
    kind: Mapped[str] = mapped_column(
        String(16)
    )  # soft_budget | exhausted | overrun | threshold:<bp>
    request_id: Mapped[str] = mapped_column(String(64), default="", server_default="")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)  # the event, as it is POSTed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(255))

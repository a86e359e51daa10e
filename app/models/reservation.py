from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, Nanos, UTCDateTime


class Reservation(Base):
    """Money held for a request in flight, one row per period it is held against.

    It carries what the sweeper needs to write the ledger entry of a request whose gateway
    died (outcome `abandoned`). No secondary indexes: a row is written and deleted by every
    request, and looked up only by its request id; the sweeper and reconcile scan the table
    (only requests in flight)."""

    __tablename__ = "reservations"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("budget_periods.id"), primary_key=True
    )
    amount: Mapped[int] = mapped_column(Nanos)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(255))
    stream: Mapped[bool] = mapped_column(Boolean)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

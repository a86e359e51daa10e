from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.models.base import NAMING_CONVENTION, Nanos, UTCDateTime


class View(DeclarativeBase):
    """Read models over the tables (SQL views, created by the migrations). Their own metadata:
    nothing creates or compares them as tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Reservation(View):
    """Money held for a request in flight, one row per period it is held against: the charges
    of the `pending` ledger entries (a view; the request path writes the entries and charges).

    A pending entry's charge holds its reservation; settlement turns both into their final
    outcome and cost in place, the sweeper turns what a crashed gateway left into `abandoned`."""

    __tablename__ = "reservations"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    amount: Mapped[int] = mapped_column(Nanos)
    key_id: Mapped[str] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(255))
    endpoint: Mapped[str] = mapped_column(String(255))
    stream: Mapped[bool] = mapped_column(Boolean)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, Nanos, UTCDateTime


class Budget(Base):
    """A spending limit and its reset schedule. A reset never touches this row."""

    __tablename__ = "budgets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # The owner (SPEC 11): a key (key_id set too, for the key's own queries) or an `owners` row.
    owner_kind: Mapped[str] = mapped_column(String(16), default="key")  # key|team|user|end_user|tag
    owner_id: Mapped[str] = mapped_column(String(40), index=True)
    key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # primary | window | parallel
    # What max_budget, spend and reserved count: usd (nano-dollars), tokens (input + output),
    # requests, or parallel (requests in flight: reserved at admission, never spent).
    unit: Mapped[str] = mapped_column(String(16), default="usd")
    # The models it applies to (None: every model).
    models: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    max_budget: Mapped[int | None] = mapped_column(Nanos)  # None: unlimited, spend still tracked
    soft_budget: Mapped[int | None] = mapped_column(Nanos)
    # Alert thresholds (SPEC 12), ascending, in basis points of the period's max_budget (8000:
    # 80 %): integers, so that the alerts pass compares them with the spend exactly, in SQL.
    # None: no thresholds (SQL NULL, not JSON null, so the pass can skip such budgets).
    alert_at_bp: Mapped[list[int] | None] = mapped_column(JSON(none_as_null=True))
    budget_duration: Mapped[str | None] = mapped_column(String(16))  # None: lifetime
    budget_timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    budget_anchor: Mapped[datetime | None] = mapped_column(UTCDateTime)  # as the user set it
    schedule_anchor: Mapped[datetime | None] = mapped_column(UTCDateTime)  # effective anchor
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

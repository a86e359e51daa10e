from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import BigInteger, Date, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, Nanos, UTCDateTime


class UsageMeasures:
    """What a rollup row sums, for the entries of one UTC day in its group."""

    requests: Mapped[int] = mapped_column(BigInteger)
    rejections: Mapped[int] = mapped_column(BigInteger)  # outcome "rejected" (the 429s)
    overruns: Mapped[int] = mapped_column(BigInteger)  # entries with overrun > 0
    spend: Mapped[int] = mapped_column(Nanos)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)


class UsageDailyByKey(UsageMeasures, Base):
    """The ledger summed per UTC day and key, for days that are over. Written only by the
    rollup pass (app/ledger/usage_rollup.py), a day at a time, with its UsageRollupDay row."""

    __tablename__ = "usage_daily_by_key"
    __table_args__ = (Index("ix_usage_daily_by_key_key_day", "key_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)


class UsageDailyByModel(UsageMeasures, Base):
    """The ledger summed per UTC day and model, for days that are over: a few rows a day,
    whatever the number of keys (what the overview reads)."""

    __tablename__ = "usage_daily_by_model"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    # "" for entries without a model (a primary key column cannot be NULL).
    model: Mapped[str] = mapped_column(String(255), primary_key=True)


class UsageRollupDay(Base):
    """A day whose rollup rows are written: its primary key makes the rollup of a day happen
    once, however many replicas run the pass."""

    __tablename__ = "usage_rollup_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    entries: Mapped[int] = mapped_column(Integer)
    rolled_at: Mapped[datetime] = mapped_column(UTCDateTime)

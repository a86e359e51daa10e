"""The usage rollup: the ledger summed per UTC day and key (`usage_daily_by_key`) and per UTC
day and model (`usage_daily_by_model`) for days that are over, written once per day by the
scheduler's pass, so that the dashboard and the usage explorer read a few rows per day (per
key, or per model) instead of every entry.

A day is rolled up once its end is `grace` in the past: an entry is stamped when it is written
(settlement, its retries and the sweeper all stamp `finished_at` with the time of writing), so
after the grace no entry can still arrive for that day. Days are rolled in order, from the
ledger's first day on, each in one transaction with its `usage_rollup_days` row, whose primary
key lets exactly one replica roll a day. So the rolled days are always one unbroken run, and
everything from the day after the last of them on is read live from the ledger (`live_since`).
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Date, Select, Table, case, func, insert, literal, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.ledger.repository import FINISHED
from app.models import LedgerEntry, UsageDailyByKey, UsageDailyByModel, UsageRollupDay

log = logging.getLogger("budgetgate.rollup")

L: Table = LedgerEntry.__table__  # type: ignore[assignment]
BY_KEY: Table = UsageDailyByKey.__table__  # type: ignore[assignment]
BY_MODEL: Table = UsageDailyByModel.__table__  # type: ignore[assignment]
MEASURES = ["requests", "rejections", "overruns", "spend", "prompt_tokens", "completion_tokens"]
D: Table = UsageRollupDay.__table__  # type: ignore[assignment]

# At most this many days per pass: a first pass over a long ledger is spread over passes.
MAX_DAYS_PER_PASS = 92


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def utc_day(when: datetime) -> date:
    return when.astimezone(UTC).date()


def _as_date(value: object) -> date:
    """SQLite returns the Date column as a date, an aggregate over it as text."""
    return value if isinstance(value, date) else date.fromisoformat(str(value))


async def last_rolled_day(conn: AsyncConnection) -> date | None:
    value = (await conn.execute(select(func.max(D.c.day)))).scalar_one_or_none()
    return None if value is None else _as_date(value)


async def live_since(conn: AsyncConnection) -> datetime | None:
    """Where the rollup ends: entries finished from then on are read from the ledger itself
    (None: nothing is rolled up yet, the whole ledger is live)."""
    last = await last_rolled_day(conn)
    return None if last is None else day_start(last + timedelta(days=1))


async def roll_up_finished_days(engine: AsyncEngine, now: datetime, grace: timedelta) -> int:
    """Roll up every day not yet rolled whose end is `grace` before `now`; returns the days
    rolled. Safe in every replica at once: a day another replica rolled first is skipped."""
    async with engine.connect() as conn:
        last = await last_rolled_day(conn)
        if last is None:
            first = (await conn.execute(select(func.min(L.c.finished_at)))).scalar_one_or_none()
            await conn.rollback()
            if first is None:
                return 0
            next_day = utc_day(first if first.tzinfo else first.replace(tzinfo=UTC))
        else:
            await conn.rollback()
            next_day = last + timedelta(days=1)
    rolled = 0
    while rolled < MAX_DAYS_PER_PASS and day_start(next_day + timedelta(days=1)) + grace <= now:
        if not await _roll_up_day(engine, next_day, now):
            break  # another replica is rolling: it goes on from here
        rolled += 1
        next_day += timedelta(days=1)
    if rolled:
        log.info("usage rollup: %d days rolled up, through %s", rolled, next_day - timedelta(1))
    return rolled


def _summed(day: date, group: list[Any]) -> Select[Any]:
    """One day's entries summed by `group`, the rollup's columns in order."""
    start, end = day_start(day), day_start(day + timedelta(days=1))
    return (
        select(
            literal(day, Date),
            *group,
            func.count(),
            func.sum(case((L.c.outcome == "rejected", 1), else_=0)),
            func.sum(case((L.c.overrun > 0, 1), else_=0)),
            func.sum(L.c.cost),
            func.coalesce(func.sum(L.c.prompt_tokens), 0),
            func.coalesce(func.sum(L.c.completion_tokens), 0),
        )
        .where(FINISHED, L.c.finished_at >= start, L.c.finished_at < end)
        .group_by(*group)
    )


async def _roll_up_day(engine: AsyncEngine, day: date, now: datetime) -> bool:
    model = func.coalesce(L.c.model, literal(""))
    try:
        async with engine.begin() as conn:
            # The marker first: a second replica on the same day stops here (or at its commit).
            await conn.execute(insert(D).values(day=day, entries=0, rolled_at=now))
            await conn.execute(
                insert(BY_KEY).from_select(["day", "key_id", *MEASURES], _summed(day, [L.c.key_id]))
            )
            await conn.execute(
                insert(BY_MODEL).from_select(["day", "model", *MEASURES], _summed(day, [model]))
            )
            entries = select(func.coalesce(func.sum(BY_MODEL.c.requests), 0)).where(
                BY_MODEL.c.day == day
            )
            await conn.execute(
                D.update().where(D.c.day == day).values(entries=entries.scalar_subquery())
            )
    except IntegrityError:
        return False
    return True

"""The overview's figures: every owner's budgets against their limits, the last 30 days by day
and by model, the week's top spenders against the week before. Read from the open periods and
the usage rollup plus today's entries (app/ui/reads.py): never a scan of the ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app.ledger.usage_rollup import day_start
from app.ui import reads
from app.ui.owners import standings

NEAREST = 25  # budgets listed, nearest to their limit first
TOP_SPENDERS = 10
CHART_DAYS = 30


def chart_dollars(nanos: int) -> float:
    """Dollars for a chart's axis (the tables show the exact figures)."""
    return float(Decimal(nanos).scaleb(-9))


def chart_amount(value: int, unit: str) -> float:
    """An amount of a budget for a chart's axis: dollars for usd, the count otherwise."""
    return chart_dollars(value) if unit == "usd" else float(value)


@dataclass(frozen=True)
class Overview:
    now: datetime
    summary: reads.StandingsSummary
    by_day: list[reads.UsageRow]  # CHART_DAYS rows, the last one today
    by_model: list[reads.UsageRow]  # biggest spend first
    top: list[reads.KeySpend]  # the last 7 days, biggest first
    top_before: dict[str, int]  # their spend in the 7 days before
    aliases: dict[str, str | None]

    @property
    def today(self) -> reads.UsageRow:
        return self.by_day[-1]

    @property
    def month(self) -> reads.UsageRow:
        return reads.total(self.by_day)

    @property
    def last7(self) -> reads.UsageRow:
        return reads.total(self.by_day[-7:])

    @property
    def prev7(self) -> reads.UsageRow:
        return reads.total(self.by_day[-14:-7])

    @property
    def change(self) -> float | None:
        """The last 7 days' spend against the 7 before (None: nothing spent then)."""
        before = self.prev7.spend
        return None if before == 0 else (self.last7.spend - before) / before

    @property
    def chart(self) -> dict[str, Any]:
        return {
            "labels": [r.group for r in self.by_day],
            "spend": [chart_dollars(r.spend) for r in self.by_day],
        }


async def read_overview(engine: AsyncEngine, now: datetime) -> Overview:
    today = now.astimezone(UTC).date()
    first = today - timedelta(days=CHART_DAYS - 1)
    since = day_start(first)
    summary = await standings(engine, NEAREST)
    by_day = reads.daily_series(await reads.usage_by(engine, "day", since, None), first, CHART_DAYS)
    by_model = sorted(await reads.usage_by(engine, "model", since, None), key=lambda r: -r.spend)
    week = day_start(today - timedelta(days=6))
    top = await reads.spend_by_key(engine, week, None, limit=TOP_SPENDERS)
    ids = [t.key_id for t in top]
    before = await reads.spend_by_key(engine, week - timedelta(days=7), week, ids)
    return Overview(
        now=now,
        summary=summary,
        by_day=by_day,
        by_model=by_model,
        top=top,
        top_before={t.key_id: t.spend for t in before},
        aliases=await reads.key_aliases(engine, ids),
    )

"""The ledger as people read it: entries, usage reports, a key's periods and the reconcile
report, in the shapes the admin API returns. The admin routes and the `budgetgate` command
both read through `LedgerReads`, so they show the same thing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import NotFound
from app.kit.money import dollars
from app.kit.times import rfc3339, to_utc
from app.ledger import repository as ledger
from app.ledger.repository import ReconcileReport

UsageGroup = Literal["key", "model", "day"]
USAGE_GROUPS: tuple[UsageGroup, ...] = ("key", "model", "day")


class ExpiredPeriodRoller(Protocol):
    """What closes periods whose end has passed (the budget repository), so that a read shows
    the current period rather than one that is over but not yet rolled."""

    async def roll_expired_periods_of_keys(self, key_ids: list[str]) -> Any: ...


@dataclass(frozen=True)
class LedgerReads:
    engine: AsyncEngine
    budgets: ExpiredPeriodRoller

    async def entries(
        self,
        *,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """`{"data": [entry, …], "next_cursor": …}`, newest first."""
        rows, next_cursor = await ledger.list_entries(
            self.engine, key_id, _utc(since), _utc(until), limit, cursor
        )
        return {"data": [entry_out(r) for r in rows], "next_cursor": next_cursor}

    async def usage(
        self, group_by: UsageGroup, since: datetime | None = None, until: datetime | None = None
    ) -> dict[str, Any]:
        """`{"group_by": …, "data": [row, …], "total_spend": …}`: spend per key, model or UTC
        day."""
        rows = await ledger.usage(self.engine, group_by, _utc(since), _utc(until))
        total = sum(r["cost_nanos"] for r in rows)
        for r in rows:
            r["spend"] = dollars(r.pop("cost_nanos"))
        return {"group_by": group_by, "data": rows, "total_spend": dollars(total)}

    async def periods(self, key_id: str, limit: int) -> list[dict[str, Any]]:
        """The key's periods (every budget's), newest first; NotFound for an unknown key."""
        await self.budgets.roll_expired_periods_of_keys([key_id])
        rows = await ledger.key_periods(self.engine, key_id, limit)
        if rows is None:
            raise NotFound(f"no key with id '{key_id}'")
        return [period_out(r) for r in rows]

    async def reconcile(self) -> ReconcileReport:
        return await ledger.reconcile(self.engine)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else to_utc(value)


def entry_out(r: Row[Any]) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "key_id": r.key_id,
        "model": r.model,
        "endpoint": r.endpoint,
        "stream": r.stream,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cost": dollars(r.cost),
        "overrun": dollars(r.overrun),
        "cost_source": r.cost_source,
        "outcome": r.outcome,
        "status_code": r.status_code,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
    }


def period_out(r: Row[Any]) -> dict[str, Any]:
    return {
        "budget_id": r.budget_id,
        "period_start": r.period_start,
        "period_end": r.period_end,
        "spend": dollars(r.spend) or 0.0,
        "reserved": dollars(r.reserved) or 0.0,
        "max_budget": dollars(r.max_budget),
        "closed_at": r.closed_at,
        "close_reason": r.close_reason,
    }


def reconcile_out(report: ReconcileReport) -> dict[str, Any]:
    """The report as JSON: whether the ledger holds, what was checked, each broken invariant,
    and the overruns recorded (which do not make it fail)."""
    return {
        "ok": report.ok,
        "periods_checked": report.periods_checked,
        "entries_checked": report.entries_checked,
        "problems": report.problems,
        "overruns": [
            {
                "request_id": o.request_id,
                "key_id": o.key_id,
                "reservation": dollars(o.reservation),
                "cost": dollars(o.cost),
                "overrun": dollars(o.overrun),
                "finished_at": rfc3339(o.finished_at),
            }
            for o in report.overruns
        ],
    }

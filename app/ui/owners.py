"""Owners of budgets, as the dashboard shows them: a scope and an id.

Only keys own budgets today; a team, user, end user or tag becomes an owner by adding a reader
for its scope to `owner_readers` (the pages and templates speak of owners, not of keys)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from app.keys.service import KeyService
from app.ledger import repository as ledger
from app.ledger.reads import LedgerReads
from app.ui import reads


def nanos(dollars: float | None) -> int | None:
    """A dollar figure of the key service (exact to the nano-dollar) back to nano-dollars."""
    return None if dollars is None else int(Decimal(repr(dollars)).scaleb(9))


@dataclass(frozen=True)
class OwnerBudget:
    window: str  # the duration, or "lifetime"
    max_budget: int | None  # nano-dollars; None: unlimited
    soft_budget: int | None
    spend: int
    reserved: int
    period_start: datetime
    reset_at: datetime | None

    @property
    def remaining(self) -> int | None:
        if self.max_budget is None:
            return None
        return max(self.max_budget - self.spend - self.reserved, 0)


@dataclass(frozen=True)
class OwnerPeriod:
    window: str
    period_start: datetime
    period_end: datetime | None
    spend: int
    max_budget: int | None
    closed_at: datetime | None
    close_reason: str | None


@dataclass(frozen=True)
class Owner:
    scope: str
    id: str
    name: str | None
    status: str
    details: dict[str, Any]  # shown as they are (settings, prefix, models, ...)
    budgets: list[OwnerBudget]

    @property
    def label(self) -> str:
        return self.name or self.id


class OwnerReader(Protocol):
    scope: str

    async def owner(self, owner_id: str) -> Owner: ...

    async def periods(self, owner_id: str, limit: int) -> list[OwnerPeriod]: ...

    async def entries(self, owner_id: str, limit: int) -> list[Any]: ...


class KeyOwners:
    """Keys as owners, read through the key service and the ledger readers."""

    scope = "key"

    def __init__(self, keys: KeyService, engine: AsyncEngine) -> None:
        self.keys = keys
        self.engine = engine

    async def owner(self, owner_id: str) -> Owner:
        k = await self.keys.get(owner_id)
        windows = [
            OwnerBudget(
                k.budget_duration or "lifetime",
                nanos(k.max_budget),
                nanos(k.soft_budget),
                nanos(k.spend) or 0,
                nanos(k.reserved) or 0,
                k.period_start,
                k.reset_at,
            )
        ]
        for b in k.budgets or []:
            windows.append(
                OwnerBudget(
                    b.budget_duration or "lifetime",
                    nanos(b.max_budget),
                    nanos(b.soft_budget),
                    nanos(b.spend) or 0,
                    nanos(b.reserved) or 0,
                    b.period_start,
                    b.reset_at,
                )
            )
        details = {
            "key prefix": k.key_prefix + "…",
            "mode": k.mode,
            "models": ", ".join(k.models) or "all",
            "created": k.created_at,
            "expires": k.expires_at,
            "timezone": k.budget_timezone,
            "alert at": ", ".join(f"{a:.0%}" for a in k.alert_at) or "—",
        }
        return Owner("key", k.id, k.alias, k.status, details, windows)

    async def periods(self, owner_id: str, limit: int) -> list[OwnerPeriod]:
        k = await self.keys.get(owner_id)
        windows = {b.budget_id: b.budget_duration or "lifetime" for b in k.budgets or []}
        reads = LedgerReads(self.engine, self.keys.budgets)
        return [
            OwnerPeriod(
                windows.get(p["budget_id"], k.budget_duration or "lifetime"),
                p["period_start"],
                p["period_end"],
                nanos(p["spend"]) or 0,
                nanos(p["max_budget"]),
                p["closed_at"],
                p["close_reason"],
            )
            for p in await reads.periods(owner_id, limit)
        ]

    async def entries(self, owner_id: str, limit: int) -> list[Any]:
        rows, _ = await ledger.list_entries(self.engine, owner_id, None, None, limit, None)
        return rows


def owner_readers(keys: KeyService, engine: AsyncEngine) -> dict[str, OwnerReader]:
    return {"key": KeyOwners(keys, engine)}


async def standings(engine: AsyncEngine, limit: int) -> reads.StandingsSummary:
    """Every owner's budgets against their limits (keys only, until other scopes own budgets:
    their standings are then merged here, nearest to the limit first)."""
    return await reads.key_standings(engine, limit)

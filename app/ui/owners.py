"""Owners of budgets, as the dashboard shows them: a scope and an id.

A key is read through the key service; a team, user, end user or tag through the owner service
(`ScopeOwners`, one reader for the four). The pages and templates speak of owners, not of keys:
a new kind of owner is a reader for its scope in `owner_readers`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from app.keys.schemas import BudgetOut, KeyOut, PeriodOut
from app.keys.service import KeyService
from app.ledger.reads import LedgerReads
from app.owners.schemas import EndUserOut, OwnerOut, TeamOut
from app.owners.service import OwnerService
from app.ui import reads


def stored(amount: float | int | None, unit: str = "usd") -> int | None:
    """An amount as the services show it (dollars, exact to the nano-dollar, for usd; the
    count otherwise) back to the ledger's integer: nano-dollars, tokens or requests."""
    if amount is None:
        return None
    return int(Decimal(repr(amount)).scaleb(9)) if unit == "usd" else int(amount)


@dataclass(frozen=True)
class OwnerBudget:
    """One budget in its open period; amounts in its unit (nano-dollars for usd)."""

    window: str  # the duration, or "lifetime"
    max_budget: int | None  # None: unlimited
    soft_budget: int | None
    spend: int
    reserved: int
    period_start: datetime
    reset_at: datetime | None
    unit: str = "usd"
    models: list[str] | None = None  # None: every model

    @property
    def remaining(self) -> int | None:
        if self.max_budget is None:
            return None
        return max(self.max_budget - self.spend - self.reserved, 0)

    @classmethod
    def primary(cls, flat: KeyOut | OwnerOut) -> OwnerBudget:
        """A key's or owner's primary budget, which the services show flat (in dollars)."""
        assert flat.period_start is not None
        return cls(
            flat.budget_duration or "lifetime",
            stored(flat.max_budget),
            stored(flat.soft_budget),
            stored(flat.spend) or 0,
            stored(flat.reserved) or 0,
            flat.period_start,
            flat.reset_at,
        )

    @classmethod
    def of(cls, b: BudgetOut) -> OwnerBudget:
        return cls(
            b.budget_duration or "lifetime",
            stored(b.max_budget, b.unit),
            stored(b.soft_budget, b.unit),
            stored(b.spend, b.unit) or 0,
            stored(b.reserved, b.unit) or 0,
            b.period_start,
            b.reset_at,
            b.unit,
            b.models,
        )


@dataclass(frozen=True)
class OwnerPeriod:
    window: str
    period_start: datetime
    period_end: datetime | None
    spend: int
    max_budget: int | None
    closed_at: datetime | None
    close_reason: str | None
    unit: str = "usd"

    @classmethod
    def of(cls, p: PeriodOut, window: str) -> OwnerPeriod:
        return cls(
            window,
            p.period_start,
            p.period_end,
            stored(p.spend, p.unit) or 0,
            stored(p.max_budget, p.unit),
            p.closed_at,
            p.close_reason,
            p.unit,
        )


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

    @property
    def ledger_match(self) -> str:
        """What the ledger's entries record this owner by: its id; a tag, by its name."""
        return self.label if self.scope == "tag" else self.id


class OwnerReader(Protocol):
    scope: str

    async def owner(self, owner_id: str) -> Owner: ...

    async def periods(self, owner_id: str, limit: int) -> list[OwnerPeriod]: ...

    async def entries(self, owner: Owner, limit: int) -> list[Any]: ...


def periods_named(
    periods: list[PeriodOut], flat: KeyOut | OwnerOut, budgets: list[BudgetOut] | None
) -> list[OwnerPeriod]:
    """Periods with their budget's window: an extra budget's, else (the primary's periods, a
    retired budget's) the primary's."""
    windows = {b.budget_id: b.budget_duration or "lifetime" for b in budgets or []}
    primary = flat.budget_duration or "lifetime"
    return [OwnerPeriod.of(p, windows.get(p.budget_id, primary)) for p in periods]


class KeyOwners:
    """Keys as owners, read through the key service and the ledger readers."""

    scope = "key"

    def __init__(self, keys: KeyService, engine: AsyncEngine) -> None:
        self.keys = keys
        self.engine = engine

    async def owner(self, owner_id: str) -> Owner:
        k = await self.keys.get(owner_id)
        details = {
            "key prefix": k.key_prefix + "…",
            "mode": k.mode,
            "models": ", ".join(k.models) or "all",
            "team": k.team_id,
            "user": k.user_id,
            "created": k.created_at,
            "expires": k.expires_at,
            "timezone": k.budget_timezone,
            "alert at": ", ".join(f"{a:.0%}" for a in k.alert_at) or "—",
        }
        budgets = [OwnerBudget.primary(k)] + [OwnerBudget.of(b) for b in k.budgets or []]
        return Owner("key", k.id, k.alias, k.status, details, budgets)

    async def periods(self, owner_id: str, limit: int) -> list[OwnerPeriod]:
        k = await self.keys.get(owner_id)
        rows = await LedgerReads(self.engine, self.keys.budgets).periods(owner_id, limit)
        return periods_named([PeriodOut.model_validate(r) for r in rows], k, k.budgets)

    async def entries(self, owner: Owner, limit: int) -> list[Any]:
        return await reads.owner_entries(self.engine, "key", owner.ledger_match, limit)


class ScopeOwners:
    """Teams, users, end users or tags (one reader per kind) as owners, read through the owner
    service; their entries are those the ledger recorded for them at admission."""

    def __init__(self, scope: str, owners: OwnerService, engine: AsyncEngine) -> None:
        self.scope = scope
        self.owners = owners
        self.engine = engine

    async def owner(self, owner_id: str) -> Owner:
        o = await self.owners.get(self.scope, owner_id)
        budgets = [OwnerBudget.of(b) for b in o.budgets or []]
        if o.period_start is not None:  # an end user seen without a template has none
            budgets.insert(0, OwnerBudget.primary(o))
        status = "deleted" if o.deleted_at is not None else "active"
        return Owner(self.scope, o.id, name_of(o), status, details_of(o), budgets)

    async def periods(self, owner_id: str, limit: int) -> list[OwnerPeriod]:
        o = await self.owners.get(self.scope, owner_id)
        periods = await self.owners.periods(self.scope, owner_id, limit)
        return periods_named(periods, o, o.budgets)

    async def entries(self, owner: Owner, limit: int) -> list[Any]:
        return await reads.owner_entries(self.engine, self.scope, owner.ledger_match, limit)


def name_of(o: OwnerOut) -> str:
    """A team's or user's alias, an end user's id (`user`), a tag's name."""
    return str(getattr(o, "alias", None) or getattr(o, "name", None) or getattr(o, "user", ""))


def details_of(o: OwnerOut) -> dict[str, Any]:
    """What the owner's page lists under Details, by what its kind has."""
    details: dict[str, Any] = {"created": o.created_at, "deleted": o.deleted_at}
    if isinstance(o, EndUserOut):
        details["seen under"] = f"team {o.team_id}" if o.team_id else f"key {o.key_id}"
    if isinstance(o, TeamOut):
        details["parallel requests"] = o.max_parallel_requests or "no limit"
        templates = o.end_user_budget or []
        details["end-user budgets"] = ", ".join(map(template_text, templates)) or "—"
    details["timezone"] = o.budget_timezone
    details["alert at"] = ", ".join(f"{a:.0%}" for a in o.alert_at) or "—"
    details["metadata"] = ", ".join(f"{k}: {v}" for k, v in o.metadata.items()) or "—"
    return details


def template_text(entry: dict[str, Any]) -> str:
    """One budget of an end-user template: "5 usd / 1d"."""
    limit = entry.get("max_budget")
    window = entry.get("budget_duration") or "lifetime"
    return f"{'no limit' if limit is None else limit} {entry.get('unit', 'usd')} / {window}"


def owner_readers(
    keys: KeyService, owners: OwnerService, engine: AsyncEngine
) -> dict[str, OwnerReader]:
    readers: dict[str, OwnerReader] = {"key": KeyOwners(keys, engine)}
    for scope in reads.OWNER_SCOPES:
        readers[scope] = ScopeOwners(scope, owners, engine)
    return readers


async def standings(engine: AsyncEngine, limit: int) -> reads.StandingsSummary:
    """Every owner's dollar budgets against their limits, the nearest to the limit first."""
    return await reads.standings(engine, limit)

"""The dashboard's read queries: budget standings from the open periods, usage from the daily
rollup plus the live tail of the ledger, key search and ledger search. Nothing here scans the
ledger beyond the live tail (since the last rolled-up day) or an index range."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, Float, Table, case, cast, func, literal, or_, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from app.errors import InvalidField
from app.kit.cursors import InvalidCursor, decode_cursor, encode_cursor
from app.ledger.usage_rollup import _as_date, day_start, live_since
from app.models import (
    ApiKey,
    Budget,
    BudgetPeriod,
    LedgerEntry,
    UsageDailyByKey,
    UsageDailyByModel,
)

K: Table = ApiKey.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
P: Table = BudgetPeriod.__table__  # type: ignore[assignment]
L: Table = LedgerEntry.__table__  # type: ignore[assignment]
BY_KEY: Table = UsageDailyByKey.__table__  # type: ignore[assignment]
BY_MODEL: Table = UsageDailyByModel.__table__  # type: ignore[assignment]

GROUPS = ("key", "model", "day")


# -- budget standings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """One budget of one owner in its open period."""

    scope: str
    owner_id: str
    owner_name: str | None
    window: str  # the budget's duration, or "lifetime"
    spend: int  # nano-dollars
    reserved: int
    max_budget: int | None
    soft_budget: int | None
    period_start: datetime
    period_end: datetime | None

    @property
    def used(self) -> float | None:
        """(spend + reserved) / max_budget; None for an unlimited budget."""
        if self.max_budget is None:
            return None
        if self.max_budget == 0:
            return 1.0
        return (self.spend + self.reserved) / self.max_budget


@dataclass
class StandingsSummary:
    owners: int = 0
    budgets: int = 0
    spend: int = 0  # the primary budgets' (each key's own), so no spend is counted twice
    reserved: int = 0
    limit: int = 0  # the sum of the limited primary budgets' max_budget
    exhausted: int = 0  # budgets at or over their limit
    near: int = 0  # budgets at 80 % or more (exhausted ones included)
    top: list[Standing] = field(default_factory=list)


# Budgets in dollars that still apply: a budget in tokens, requests or parallel requests is not
# money, and a retired one applies to nothing (its history stays in the periods).
_DOLLAR_BUDGETS = (B.c.unit == "usd", B.c.retired_at.is_(None))


def _used_ratio() -> ColumnElement[Any]:
    return case(
        (P.c.max_budget.is_(None), None),
        (P.c.max_budget == 0, 1.0),
        else_=cast(P.c.spend + P.c.reserved, Float) / cast(P.c.max_budget, Float),
    )


async def key_standings(engine: AsyncEngine, limit: int) -> StandingsSummary:
    """Active keys' budgets in their open periods: totals, and the `limit` nearest to their
    limit (unlimited ones after, by spend). Reads the open periods only (one per budget)."""
    ratio = _used_ratio()
    base = (
        select(
            P.c.spend,
            P.c.reserved,
            P.c.max_budget,
            K.c.id,
            ratio.label("used"),
            (B.c.kind == "primary").label("primary"),
        )
        .select_from(P)
        .join(B, B.c.id == P.c.budget_id)
        .join(K, K.c.id == B.c.key_id)
        .where(P.c.closed_at.is_(None), K.c.status == "active", *_DOLLAR_BUDGETS)
    ).subquery()
    # Money over the primary budgets only: a key's extra windows count the same spend again.
    primary = base.c.primary

    def primary_sum(column: Any) -> Any:
        return func.coalesce(func.sum(case((primary, column), else_=0)), 0)

    totals = select(
        func.count(func.distinct(base.c.id)),
        func.count(),
        primary_sum(base.c.spend),
        primary_sum(base.c.reserved),
        primary_sum(base.c.max_budget),
        func.coalesce(func.sum(case((base.c.used >= 1.0, 1), else_=0)), 0),
        func.coalesce(func.sum(case((base.c.used >= 0.8, 1), else_=0)), 0),
    )
    top = (
        select(
            K.c.id,
            K.c.alias,
            B.c.budget_duration,
            B.c.soft_budget,
            P.c.spend,
            P.c.reserved,
            P.c.max_budget,
            P.c.period_start,
            P.c.period_end,
        )
        .select_from(P)
        .join(B, B.c.id == P.c.budget_id)
        .join(K, K.c.id == B.c.key_id)
        .where(P.c.closed_at.is_(None), K.c.status == "active", *_DOLLAR_BUDGETS)
        .order_by(ratio.desc().nulls_last(), P.c.spend.desc(), K.c.id)
        .limit(limit)
    )
    async with engine.connect() as conn:
        t = (await conn.execute(totals)).one()
        rows = (await conn.execute(top)).all()
        await conn.rollback()
    return StandingsSummary(
        owners=int(t[0]),
        budgets=int(t[1]),
        spend=int(t[2]),
        reserved=int(t[3]),
        limit=int(t[4]),
        exhausted=int(t[5]),
        near=int(t[6]),
        top=[
            Standing(
                "key",
                r.id,
                r.alias,
                r.budget_duration or "lifetime",
                r.spend,
                r.reserved,
                r.max_budget,
                r.soft_budget,
                r.period_start,
                r.period_end,
            )
            for r in rows
        ],
    )


# -- usage: the rollup and the live tail -------------------------------------------------------


@dataclass
class UsageRow:
    group: str | None
    requests: int = 0
    rejections: int = 0
    overruns: int = 0
    spend: int = 0  # nano-dollars
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: UsageRow) -> None:
        self.requests += other.requests
        self.rejections += other.rejections
        self.overruns += other.overruns
        self.spend += other.spend
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


def _ceil_day(when: datetime) -> datetime:
    start = day_start(when.date())
    return start if start == when else start + timedelta(days=1)


def _floor_day(when: datetime) -> datetime:
    return day_start(when.date())


def _rollup_for(group_by: str, key_id: str | None) -> Table | None:
    """The rollup that answers this grouping: per model (a few rows a day) when no key is
    asked for, per key otherwise; none for one key's models (its entries are read through the
    (key_id, finished_at) index)."""
    if key_id is None and group_by in ("model", "day"):
        return BY_MODEL
    if group_by in ("key", "day"):
        return BY_KEY
    return None


async def usage_by(
    engine: AsyncEngine,
    group_by: str,
    since: datetime | None,
    until: datetime | None,
    key_id: str | None = None,
) -> list[UsageRow]:
    """The ledger's usage in [since, until) grouped by key, model or UTC day: the figures of
    `GET /admin/usage`, from the daily rollup for the whole days it covers and from the ledger
    for the rest (the partial days at the edges and the days not rolled up yet)."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by: one of {GROUPS}")
    rollup = _rollup_for(group_by, key_id)
    async with engine.connect() as conn:
        rolled_end = await live_since(conn) if rollup is not None else None
        parts: list[UsageRow] = []
        live_ranges: list[tuple[datetime | None, datetime | None]] = [(since, until)]
        if rollup is not None and rolled_end is not None:
            r_start = None if since is None else _ceil_day(since)
            r_end = rolled_end if until is None else min(_floor_day(until), rolled_end)
            if r_start is None or r_start < r_end:
                parts += await _rolled(conn, rollup, group_by, r_start, r_end, key_id)
                live_ranges = [(r_end, until)]
                if r_start is not None and since is not None and since < r_start:
                    live_ranges.append((since, r_start))
        for lo, hi in live_ranges:
            parts += await _live(conn, engine.dialect.name, group_by, lo, hi, key_id)
        await conn.rollback()
    merged: dict[str | None, UsageRow] = {}
    for row in parts:
        merged.setdefault(row.group, UsageRow(row.group)).add(row)
    return sorted(merged.values(), key=lambda r: (r.group is None, r.group or ""))


async def _rolled(
    conn: AsyncConnection,
    rollup: Table,
    group_by: str,
    start: datetime | None,
    end: datetime,
    key_id: str | None,
) -> list[UsageRow]:
    group: Any = {"key": "key_id", "model": "model", "day": "day"}[group_by]
    group = rollup.c[group]
    q = (
        select(
            group.label("group"),
            func.sum(rollup.c.requests),
            func.sum(rollup.c.rejections),
            func.sum(rollup.c.overruns),
            func.sum(rollup.c.spend),
            func.sum(rollup.c.prompt_tokens),
            func.sum(rollup.c.completion_tokens),
        )
        .where(rollup.c.day < end.date())
        .group_by(group)
    )
    if start is not None:
        q = q.where(rollup.c.day >= start.date())
    if key_id is not None:
        q = q.where(rollup.c.key_id == key_id)
    rows = (await conn.execute(q)).all()
    out = []
    for r in rows:
        g: str | None
        if group_by == "day":
            g = _as_date(r.group).isoformat()
        elif group_by == "model":
            g = r.group or None  # "" stands for no model in the rollup's key
        else:
            g = r.group
        out.append(UsageRow(g, *(int(v or 0) for v in r[1:])))
    return out


async def _live(
    conn: AsyncConnection,
    dialect: str,
    group_by: str,
    since: datetime | None,
    until: datetime | None,
    key_id: str | None,
) -> list[UsageRow]:
    if since is not None and until is not None and since >= until:
        return []
    group: Any
    if group_by == "key":
        group = L.c.key_id
    elif group_by == "model":
        group = L.c.model
    elif dialect == "sqlite":
        group = func.date(L.c.finished_at)
    else:  # UTC days, as GET /admin/usage counts them
        group = cast(func.timezone("UTC", L.c.finished_at), Date)
    q = select(
        group.label("group"),
        func.count(),
        func.sum(case((L.c.outcome == "rejected", 1), else_=0)),
        func.sum(case((L.c.overrun > 0, 1), else_=0)),
        func.coalesce(func.sum(L.c.cost), 0),
        func.coalesce(func.sum(L.c.prompt_tokens), 0),
        func.coalesce(func.sum(L.c.completion_tokens), 0),
    ).group_by(group)
    if since is not None:
        q = q.where(L.c.finished_at >= since)
    if until is not None:
        q = q.where(L.c.finished_at < until)
    if key_id is not None:
        q = q.where(L.c.key_id == key_id)
    rows = (await conn.execute(q)).all()
    return [
        UsageRow(None if r.group is None else str(r.group), *(int(v or 0) for v in r[1:]))
        for r in rows
    ]


@dataclass(frozen=True)
class KeySpend:
    key_id: str
    spend: int
    requests: int
    rejections: int


async def spend_by_key(
    engine: AsyncEngine,
    since: datetime,
    until: datetime | None,
    key_ids: list[str] | None = None,
    limit: int | None = None,
) -> list[KeySpend]:
    """Spend per key in [since, until) (since and until on day boundaries), biggest first: the
    rollup's whole days and the ledger's entries after them, summed in one query so that only
    the `limit` biggest come back."""
    async with engine.connect() as conn:
        rolled_end = await live_since(conn)
        parts: list[Any] = []
        live_from = since
        if rolled_end is not None and since < rolled_end:
            r_end = rolled_end if until is None else min(until, rolled_end)
            rolled = select(
                BY_KEY.c.key_id,
                BY_KEY.c.spend,
                BY_KEY.c.requests,
                BY_KEY.c.rejections,
            ).where(BY_KEY.c.day >= since.date(), BY_KEY.c.day < r_end.date())
            if key_ids is not None:
                rolled = rolled.where(BY_KEY.c.key_id.in_(key_ids))
            parts.append(rolled)
            live_from = r_end
        if until is None or live_from < until:
            live = select(
                L.c.key_id,
                L.c.cost.label("spend"),
                literal(1).label("requests"),
                case((L.c.outcome == "rejected", 1), else_=0).label("rejections"),
            ).where(L.c.finished_at >= live_from)
            if until is not None:
                live = live.where(L.c.finished_at < until)
            if key_ids is not None:
                live = live.where(L.c.key_id.in_(key_ids))
            parts.append(live)
        if not parts:
            await conn.rollback()
            return []
        both = union_all(*parts).subquery()
        spend = func.sum(both.c.spend)
        q = (
            select(both.c.key_id, spend, func.sum(both.c.requests), func.sum(both.c.rejections))
            .group_by(both.c.key_id)
            .order_by(spend.desc(), both.c.key_id)
        )
        if limit is not None:
            q = q.limit(limit)
        rows = (await conn.execute(q)).all()
        await conn.rollback()
    return [KeySpend(r[0], int(r[1] or 0), int(r[2] or 0), int(r[3] or 0)) for r in rows]


def total(rows: Iterable[UsageRow]) -> UsageRow:
    out = UsageRow("total")
    for r in rows:
        out.add(r)
    return out


def daily_series(rows: list[UsageRow], first: date, days: int) -> list[UsageRow]:
    """One row per day from `first`, days without usage included (as zeros)."""
    by_day = {r.group: r for r in rows}
    out = []
    for i in range(days):
        d = (first + timedelta(days=i)).isoformat()
        out.append(by_day.get(d) or UsageRow(d))
    return out


# -- key search ------------------------------------------------------------------------------

KEY_FILTERS = ("all", "active", "revoked", "near", "exhausted", "unlimited")


@dataclass(frozen=True)
class KeyRow:
    id: str
    alias: str | None
    key_prefix: str
    status: str
    expires_at: datetime | None
    spend: int
    reserved: int
    max_budget: int | None
    budget_duration: str | None
    period_end: datetime | None

    @property
    def used(self) -> float | None:
        if self.max_budget is None:
            return None
        if self.max_budget == 0:
            return 1.0
        return (self.spend + self.reserved) / self.max_budget


async def search_keys(
    engine: AsyncEngine, text: str, status: str, offset: int, limit: int
) -> tuple[list[KeyRow], int]:
    """Keys whose alias, id or prefix contains `text` (any case), filtered by status or by
    how much of the primary budget is used; a page and the number of matches."""
    ratio = _used_ratio()
    q = (
        select(
            K.c.id,
            K.c.alias,
            K.c.key_prefix,
            K.c.status,
            K.c.expires_at,
            P.c.spend,
            P.c.reserved,
            P.c.max_budget,
            B.c.budget_duration,
            P.c.period_end,
        )
        .select_from(K)
        .join(B, (B.c.key_id == K.c.id) & (B.c.kind == "primary"))
        .join(P, (P.c.budget_id == B.c.id) & P.c.closed_at.is_(None))
    )
    if text:
        pattern = (
            "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        q = q.where(
            or_(
                func.lower(K.c.alias).like(pattern, escape="\\"),
                func.lower(K.c.id).like(pattern, escape="\\"),
                func.lower(K.c.key_prefix).like(pattern, escape="\\"),
            )
        )
    if status in ("active", "revoked"):
        q = q.where(K.c.status == status)
    elif status == "near":
        q = q.where(K.c.status == "active", ratio >= 0.8)
    elif status == "exhausted":
        q = q.where(K.c.status == "active", ratio >= 1.0)
    elif status == "unlimited":
        q = q.where(P.c.max_budget.is_(None))
    count = select(func.count()).select_from(q.subquery())
    page = (
        q.order_by(func.lower(func.coalesce(K.c.alias, K.c.id)), K.c.id).offset(offset).limit(limit)
    )
    async with engine.connect() as conn:
        n = (await conn.execute(count)).scalar_one()
        rows = (await conn.execute(page)).all()
        await conn.rollback()
    return [KeyRow(**r._asdict()) for r in rows], int(n)


async def key_aliases(engine: AsyncEngine, key_ids: Iterable[str]) -> dict[str, str | None]:
    """The aliases of these keys (of every key when they are many: one read of the keys table
    instead of a list of parameters longer than SQLite takes)."""
    ids = set(key_ids)
    if not ids:
        return {}
    q = select(K.c.id, K.c.alias)
    if len(ids) <= 500:
        q = q.where(K.c.id.in_(sorted(ids)))
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
        await conn.rollback()
    return {r.id: r.alias for r in rows if r.id in ids}


# -- ledger search ---------------------------------------------------------------------------

OUTCOMES = ("ok", "rejected", "upstream_error", "client_disconnect", "timeout", "abandoned")


@dataclass(frozen=True)
class LedgerQuery:
    key_id: str | None = None
    request_id: str | None = None
    outcome: str | None = None
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    overruns_only: bool = False


async def search_ledger(
    engine: AsyncEngine, query: LedgerQuery, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    """Entries newest first, keyset-paginated on (finished_at, request_id) like
    GET /admin/ledger, with the dashboard's extra filters (a request id finds its one entry)."""
    q = select(L).order_by(L.c.finished_at.desc(), L.c.request_id.desc()).limit(limit + 1)
    if query.request_id:
        q = q.where(L.c.request_id == query.request_id)
    if query.key_id:
        q = q.where(L.c.key_id == query.key_id)
    if query.outcome:
        q = q.where(L.c.outcome == query.outcome)
    if query.model:
        q = q.where(L.c.model == query.model)
    if query.overruns_only:
        q = q.where(L.c.overrun > 0)
    if query.since is not None:
        q = q.where(L.c.finished_at >= query.since)
    if query.until is not None:
        q = q.where(L.c.finished_at < query.until)
    if cursor:
        stamp, request_id = _entry_after(cursor)
        q = q.where(
            or_(L.c.finished_at < stamp, (L.c.finished_at == stamp) & (L.c.request_id < request_id))
        )
    async with engine.connect() as conn:
        rows = list((await conn.execute(q)).all())
        await conn.rollback()
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1].finished_at.isoformat(), page[-1].request_id)
        if len(rows) > limit
        else None
    )
    return page, next_cursor


def _entry_after(cursor: str) -> tuple[datetime, str]:
    """The (finished_at, request_id) a cursor names, as GET /admin/ledger's cursors do."""
    try:
        stamp, request_id = decode_cursor(cursor, 2)
        return datetime.fromisoformat(stamp), request_id
    except (InvalidCursor, ValueError):
        raise InvalidField("cursor: not a cursor returned by this API", param="cursor") from None

"""The dashboard's read queries: budget standings from the open periods, usage from the daily
rollup plus the live tail of the ledger, key and owner search, ledger search and an owner's
entries. Nothing here scans the ledger beyond the live tail (since the last rolled-up day) or
an index range."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Date,
    Float,
    Select,
    Table,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from app.ledger import repository as ledger
from app.ledger.usage_rollup import _as_date, day_start, live_since
from app.models import (
    ApiKey,
    Budget,
    BudgetPeriod,
    LedgerEntry,
    Owner,
    UsageDailyByKey,
    UsageDailyByModel,
)

K: Table = ApiKey.__table__  # type: ignore[assignment]
OWN: Table = Owner.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
P: Table = BudgetPeriod.__table__  # type: ignore[assignment]
L: Table = LedgerEntry.__table__  # type: ignore[assignment]
BY_KEY: Table = UsageDailyByKey.__table__  # type: ignore[assignment]
BY_MODEL: Table = UsageDailyByModel.__table__  # type: ignore[assignment]

GROUPS = ("key", "model", "day")


# -- budget standings ------------------------------------------------------------------------


def share_used(spend: int, reserved: int, max_budget: int | None) -> float | None:
    """(spend + reserved) / max_budget; None for an unlimited budget, 1 for a zero one."""
    if max_budget is None:
        return None
    if max_budget == 0:
        return 1.0
    return (spend + reserved) / max_budget


@dataclass(frozen=True)
class Standing:
    """One budget of one owner in its open period."""

    scope: str  # key, team, user, end_user or tag
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
        return share_used(self.spend, self.reserved, self.max_budget)


@dataclass
class StandingsSummary:
    owners: int = 0
    budgets: int = 0
    # Money over the keys' primary budgets only: every dollar is charged to exactly one key,
    # and a key's extra windows, its team's, user's, end user's and tags' budgets count the
    # same dollars again.
    spend: int = 0
    reserved: int = 0
    limit: int = 0  # the sum of the limited keys' primary max_budget
    exhausted: int = 0  # budgets at or over their limit
    near: int = 0  # budgets at 80 % or more (exhausted ones included)
    top: list[Standing] = field(default_factory=list)


def _used_ratio() -> ColumnElement[Any]:
    return case(
        (P.c.max_budget.is_(None), None),
        (P.c.max_budget == 0, 1.0),
        else_=cast(P.c.spend + P.c.reserved, Float) / cast(P.c.max_budget, Float),
    )


def _open_dollar_budgets(*columns: Any) -> Select[Any]:
    """The open periods of the dollar budgets that still apply, of active keys and of owners
    not deleted: one row per budget. A budget in tokens or requests is not money, and a
    retired one applies to nothing (its history stays in the periods)."""
    return (
        select(*columns)
        .select_from(P)
        .join(B, B.c.id == P.c.budget_id)
        .outerjoin(K, (K.c.id == B.c.key_id) & (B.c.owner_kind == "key"))
        .outerjoin(OWN, (OWN.c.id == B.c.owner_id) & (B.c.owner_kind != "key"))
        .where(
            P.c.closed_at.is_(None),
            B.c.unit == "usd",
            B.c.retired_at.is_(None),
            or_(K.c.status == "active", OWN.c.id.is_not(None) & OWN.c.deleted_at.is_(None)),
        )
    )


async def standings(engine: AsyncEngine, limit: int) -> StandingsSummary:
    """Every owner's dollar budgets in their open periods (keys, teams, users, end users,
    tags): totals, and the `limit` nearest to their limit (unlimited ones after, by spend).
    Two queries over the open periods (one row per budget), whatever the ledger's size."""
    ratio = _used_ratio()
    base = _open_dollar_budgets(
        P.c.spend,
        P.c.reserved,
        P.c.max_budget,
        B.c.owner_id,
        ratio.label("used"),
        ((B.c.kind == "primary") & (B.c.owner_kind == "key")).label("money"),
    ).subquery()

    def money_sum(column: Any) -> Any:
        return func.coalesce(func.sum(case((base.c.money, column), else_=0)), 0)

    totals = select(
        func.count(func.distinct(base.c.owner_id)),  # ids are unique across kinds (prefixed)
        func.count(),
        money_sum(base.c.spend),
        money_sum(base.c.reserved),
        money_sum(base.c.max_budget),
        func.coalesce(func.sum(case((base.c.used >= 1.0, 1), else_=0)), 0),
        func.coalesce(func.sum(case((base.c.used >= 0.8, 1), else_=0)), 0),
    )
    top = (
        _open_dollar_budgets(
            B.c.owner_kind,
            B.c.owner_id,
            func.coalesce(K.c.alias, OWN.c.name).label("name"),
            B.c.budget_duration,
            B.c.soft_budget,
            P.c.spend,
            P.c.reserved,
            P.c.max_budget,
            P.c.period_start,
            P.c.period_end,
        )
        .order_by(ratio.desc().nulls_last(), P.c.spend.desc(), B.c.owner_id, B.c.id)
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
                r.owner_kind,
                r.owner_id,
                r.name,
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
    q = (
        select(
            group.label("group"),
            func.count(),
            func.sum(case((L.c.outcome == "rejected", 1), else_=0)),
            func.sum(case((L.c.overrun > 0, 1), else_=0)),
            func.coalesce(func.sum(L.c.cost), 0),
            func.coalesce(func.sum(L.c.prompt_tokens), 0),
            func.coalesce(func.sum(L.c.completion_tokens), 0),
        )
        .where(ledger.FINISHED)
        .group_by(group)
    )
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
            ).where(ledger.FINISHED, L.c.finished_at >= live_from)
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


# -- key and owner search --------------------------------------------------------------------

KEY_FILTERS = ("all", "active", "revoked", "near", "exhausted", "unlimited")
OWNER_SCOPES = ("team", "user", "end_user", "tag")


def _containing(text: str, *columns: Any) -> ColumnElement[bool]:
    """Any of the columns contains `text`, in any case (LIKE's wildcards in it taken as
    they are)."""
    escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{escaped}%"
    return or_(*(func.lower(c).like(pattern, escape="\\") for c in columns))


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
        return share_used(self.spend, self.reserved, self.max_budget)


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
        q = q.where(_containing(text, K.c.alias, K.c.id, K.c.key_prefix))
    if status in ("active", "revoked"):
        q = q.where(K.c.status == status)
    elif status == "near":
        q = q.where(K.c.status == "active", ratio >= 0.8)
    elif status == "exhausted":
        q = q.where(K.c.status == "active", ratio >= 1.0)
    elif status == "unlimited":
        q = q.where(P.c.max_budget.is_(None))
    order = (func.lower(func.coalesce(K.c.alias, K.c.id)), K.c.id)
    rows = await _page(engine, q, order, offset, limit)
    return [KeyRow(**r._asdict()) for r in rows], await _count(engine, q)


@dataclass(frozen=True)
class OwnerRow:
    """A team, user, end user or tag, with its primary (dollar) budget's open period; an owner
    without one (an end user seen without a template, a deleted owner) has no figures."""

    kind: str
    id: str
    name: str
    scope: str  # an end user's team (team:<id>) or key (key:<id>); empty for the others
    deleted_at: datetime | None
    spend: int | None
    reserved: int | None
    max_budget: int | None
    budget_duration: str | None
    period_end: datetime | None

    @property
    def used(self) -> float | None:
        if self.spend is None or self.reserved is None:
            return None
        return share_used(self.spend, self.reserved, self.max_budget)


async def search_owners(
    engine: AsyncEngine, scope: str | None, text: str, offset: int, limit: int
) -> tuple[list[OwnerRow], int]:
    """Teams, users, end users and tags (or one of them) whose name or id contains `text`
    (any case), deleted ones too; a page by name and the number of matches."""
    primary = (B.c.owner_id == OWN.c.id) & (B.c.kind == "primary") & B.c.retired_at.is_(None)
    q = (
        select(
            OWN.c.kind,
            OWN.c.id,
            OWN.c.name,
            OWN.c.scope,
            OWN.c.deleted_at,
            P.c.spend,
            P.c.reserved,
            P.c.max_budget,
            B.c.budget_duration,
            P.c.period_end,
        )
        .select_from(OWN)
        .outerjoin(B, primary)
        .outerjoin(P, (P.c.budget_id == B.c.id) & P.c.closed_at.is_(None))
    )
    if scope is not None:
        q = q.where(OWN.c.kind == scope)
    if text:
        q = q.where(_containing(text, OWN.c.name, OWN.c.id))
    order = (func.lower(OWN.c.name), OWN.c.id)
    rows = await _page(engine, q, order, offset, limit)
    return [OwnerRow(**r._asdict()) for r in rows], await _count(engine, q)


async def _page(
    engine: AsyncEngine, q: Select[Any], order: tuple[Any, ...], offset: int, limit: int
) -> list[Any]:
    async with engine.connect() as conn:
        rows = (await conn.execute(q.order_by(*order).offset(offset).limit(limit))).all()
        await conn.rollback()
    return list(rows)


async def _count(engine: AsyncEngine, q: Select[Any]) -> int:
    async with engine.connect() as conn:
        n = (await conn.execute(select(func.count()).select_from(q.subquery()))).scalar_one()
        await conn.rollback()
    return int(n)


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
    owner: tuple[str, str] | None = None  # (scope, what the ledger records it by): owned_by


async def search_ledger(
    engine: AsyncEngine, query: LedgerQuery, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    """Entries newest first, keyset-paginated on (finished_at, request_id) like
    GET /admin/ledger, with the dashboard's extra filters (a request id finds its one entry)."""
    given = [
        (L.c.request_id, query.request_id),
        (L.c.key_id, query.key_id),
        (L.c.outcome, query.outcome),
        (L.c.model, query.model),
    ]
    conditions = [column == value for column, value in given if value]
    if query.overruns_only:
        conditions.append(L.c.overrun > 0)
    if query.owner is not None:
        conditions.append(owned_by(engine.dialect.name, *query.owner))
    conditions += ledger.finished_within(query.since, query.until)
    return await ledger.entries_page(engine, conditions, limit, cursor)


def owned_by(dialect: str, scope: str, match: str) -> ColumnElement[bool]:
    """The ledger entries of an owner: those whose key, team, user or end user column is
    `match`, its id (as of the entry's admission); a tag's, those whose tags list holds
    `match`, its name (the ledger records tags by name)."""
    if scope == "tag":
        return ledger.tagged(dialect, match)
    return ledger.USAGE_COLUMNS[scope] == match


async def owner_entries(engine: AsyncEngine, scope: str, match: str, limit: int) -> list[Any]:
    """An owner's latest entries, newest first. The ledger has no index on the team, user, end
    user or tags columns: the finished_at index is walked from the newest entry until `limit`
    match, quick for an owner that spent lately, longer for one long quiet."""
    condition = owned_by(engine.dialect.name, scope, match)
    rows, _ = await ledger.entries_page(engine, [condition], limit, None)
    return rows

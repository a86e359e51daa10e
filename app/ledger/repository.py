"""Reading the ledger: entries, usage reports, and the invariant checks of `reconcile`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Date, Select, Table, case, cast, func, literal_column, or_, select, true
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from app.errors import InvalidField
from app.kit.cursors import decode_cursor, encode_cursor
from app.models import (
    ApiKey,
    Budget,
    BudgetPeriod,
    LedgerCharge,
    LedgerEntry,
    Owner,
    Reservation,
)

L: Table = LedgerEntry.__table__  # type: ignore[assignment]
C: Table = LedgerCharge.__table__  # type: ignore[assignment]
P: Table = BudgetPeriod.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
# A view: the charges of pending entries (the reservations they hold).
R: Table = Reservation.__table__  # type: ignore[assignment]

# Requests in flight have a pending entry (its charges hold the reservation): not finished, so
# not listed, counted in usage or checked as spend. A literal, not a parameter, so that
# PostgreSQL's generic plans can match the partial index of pending entries.
FINISHED = L.c.outcome != literal_column("'pending'")
PENDING = L.c.outcome == literal_column("'pending'")


def _entry_after(cursor: str) -> tuple[datetime, str]:
    """The (finished_at, request_id) an entry-list cursor names: the last entry of the page
    before."""
    try:
        stamp, request_id = decode_cursor(cursor, 2)
        return datetime.fromisoformat(stamp), request_id
    except ValueError:  # InvalidCursor, or a stamp that is not a time
        raise InvalidField("cursor: not a cursor returned by this API", param="cursor") from None


@dataclass
class OpenBudget:
    key_id: str  # "" for a budget of another owner
    alias: str | None
    window: str  # the budget's duration, or "lifetime"
    spend: int
    max_budget: int | None
    scope: str = "key"  # who owns it: key, team, user, end_user, tag
    owner_id: str = ""
    owner_name: str | None = None


async def open_budgets(engine: AsyncEngine) -> list[OpenBudget]:
    """The dollar budgets, in their open periods, of every active key and every owner not
    deleted (for the opt-in budget gauges)."""
    K: Table = ApiKey.__table__  # type: ignore[assignment]
    OWN: Table = Owner.__table__  # type: ignore[assignment]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    B.c.owner_kind,
                    B.c.owner_id,
                    K.c.id,
                    K.c.alias,
                    OWN.c.name,
                    B.c.budget_duration,
                    P.c.spend,
                    P.c.max_budget,
                )
                .select_from(B)
                .join(P, P.c.budget_id == B.c.id)
                .outerjoin(K, K.c.id == B.c.key_id)
                .outerjoin(OWN, (OWN.c.id == B.c.owner_id) & (B.c.owner_kind != "key"))
                .where(
                    P.c.closed_at.is_(None),
                    B.c.retired_at.is_(None),
                    B.c.unit == "usd",
                    or_(
                        K.c.status == "active",
                        (B.c.owner_kind != "key") & OWN.c.deleted_at.is_(None),
                    ),
                )
                .order_by(B.c.owner_kind, B.c.owner_id, B.c.kind, B.c.id)
            )
        ).all()
        await conn.rollback()
    return [
        OpenBudget(
            r.id or "",
            r.alias,
            r.budget_duration or "lifetime",
            r.spend,
            r.max_budget,
            r.owner_kind,
            r.owner_id,
            r.alias if r.owner_kind == "key" else r.name,
        )
        for r in rows
    ]


async def count_open_reservations(engine: AsyncEngine) -> int:
    """Reservations held now: requests in flight on every replica."""
    async with engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(R))).scalar_one()
        await conn.rollback()
    return int(count)


async def list_entries(
    engine: AsyncEngine,
    key_id: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    """Newest first, keyset-paginated on (finished_at, request_id)."""
    conditions: list[ColumnElement[bool]] = []
    if key_id is not None:
        conditions.append(L.c.key_id == key_id)
    return await entries_page(engine, finished_within(since, until) + conditions, limit, cursor)


async def entries_page(
    engine: AsyncEngine,
    conditions: list[ColumnElement[bool]],
    limit: int,
    cursor: str | None,
) -> tuple[list[Any], str | None]:
    """The entries that meet every condition, newest first, keyset-paginated on
    (finished_at, request_id): a page and the cursor of the next one (None: the last page)."""
    q = (
        select(L)
        .where(FINISHED, *conditions)  # (a pending entry is a request in flight, not yet one)
        .order_by(L.c.finished_at.desc(), L.c.request_id.desc())
        .limit(limit + 1)
    )
    if cursor is not None:
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


def finished_within(since: datetime | None, until: datetime | None) -> list[ColumnElement[bool]]:
    """Entries finished in [since, until) (None: no bound on that side)."""
    conditions: list[ColumnElement[bool]] = []
    if since is not None:
        conditions.append(L.c.finished_at >= since)
    if until is not None:
        conditions.append(L.c.finished_at < until)
    return conditions


async def key_periods(engine: AsyncEngine, key_id: str, limit: int) -> list[Row[Any]] | None:
    """The key's periods (every budget's), newest first; None for an unknown key."""
    K: Table = ApiKey.__table__  # type: ignore[assignment]
    async with engine.connect() as conn:
        if (await conn.execute(select(K.c.id).where(K.c.id == key_id))).first() is None:
            await conn.rollback()
            return None
        page = await _owner_periods(conn, "key", key_id, limit)
        await conn.rollback()
    return page


async def owner_periods(
    engine: AsyncEngine, owner_kind: str, owner_id: str, limit: int
) -> list[Row[Any]]:
    """The periods of every budget of an owner (team, user, end_user, tag), retired ones'
    too, newest first."""
    async with engine.connect() as conn:
        page = await _owner_periods(conn, owner_kind, owner_id, limit)
        await conn.rollback()
    return page


async def _owner_periods(
    conn: AsyncConnection, owner_kind: str, owner_id: str, limit: int
) -> list[Row[Any]]:
    rows = await conn.execute(
        select(P, B.c.kind, B.c.unit)
        .join(B, B.c.id == P.c.budget_id)
        .where(B.c.owner_kind == owner_kind, B.c.owner_id == owner_id)
        .order_by(P.c.period_start.desc(), P.c.id.desc())
        .limit(limit)
    )
    return list(rows.all())


# usage(group_by=...): the ledger entry column each scope is read from (SPEC 11).
USAGE_COLUMNS = {
    "key": L.c.key_id,
    "model": L.c.model,
    "team": L.c.team_id,
    "user": L.c.user_id,
    "end_user": L.c.end_user_id,
}
USAGE_GROUPS = (*USAGE_COLUMNS, "tag", "day")


async def usage(
    engine: AsyncEngine, group_by: str, since: datetime | None, until: datetime | None
) -> list[dict[str, Any]]:
    """Spend, requests and tokens per group. By tag, an entry with two tags counts in both
    groups (and an untagged one in the null group), so the groups may sum to more than the
    ledger: see usage_total."""
    group: Any
    tags: Any = None
    if group_by in USAGE_COLUMNS:
        group = USAGE_COLUMNS[group_by]
    elif group_by == "tag":
        tags = tag_values(engine.dialect.name)
        group = tags.c.value
    else:
        group = (
            func.date(L.c.finished_at)
            if engine.dialect.name == "sqlite"
            # UTC days, whatever the server's or session's TimeZone setting.
            else cast(func.timezone("UTC", L.c.finished_at), Date)
        )
    q = (
        select(
            group.label("group"),
            func.count().label("requests"),
            func.coalesce(func.sum(L.c.cost), 0).label("cost"),
            func.coalesce(func.sum(L.c.prompt_tokens), 0).label("prompt_tokens"),
            func.coalesce(func.sum(L.c.completion_tokens), 0).label("completion_tokens"),
        )
        .where(FINISHED)
        .group_by(group)
        .order_by(group)
    )
    if tags is not None:
        q = q.select_from(L).outerjoin(tags, true())
    q = _within(q, since, until)
    async with engine.connect() as conn:
        rows = (await conn.execute(q)).all()
        await conn.rollback()
    return [
        {
            group_by: str(r.group) if r.group is not None else None,
            "requests": int(r.requests),
            "cost_nanos": int(r.cost),
            "prompt_tokens": int(r.prompt_tokens),
            "completion_tokens": int(r.completion_tokens),
        }
        for r in rows
    ]


async def usage_total(engine: AsyncEngine, since: datetime | None, until: datetime | None) -> int:
    """The ledger's spend in nano-dollars (each entry once, whatever its tags)."""
    q = _within(select(func.coalesce(func.sum(L.c.cost), 0)).select_from(L), since, until)
    async with engine.connect() as conn:
        total = (await conn.execute(q)).scalar_one()
        await conn.rollback()
    return int(total)


def _within(q: Any, since: datetime | None, until: datetime | None) -> Any:
    return q.where(*finished_within(since, until))


def tag_values(dialect: str) -> Any:
    """An entry's tags as a table of one column, `value` (one row a tag): what usage by tag
    joins, and what finds the entries of one tag."""
    if dialect == "postgresql":
        elements = func.json_array_elements_text(L.c.tags).table_valued("value")
        return elements.render_derived(name="tag")
    return func.json_each(L.c.tags).table_valued("value").alias("tag")


def tagged(dialect: str, tag: str) -> ColumnElement[bool]:
    """The entries carrying this tag (their `tags` list holds it)."""
    tags = tag_values(dialect)
    return select(literal_column("1")).select_from(tags).where(tags.c.value == tag).exists()


@dataclass(frozen=True)
class Overrun:
    """A request charged more than it reserved (SPEC 10): recorded, not a problem."""

    request_id: str
    key_id: str
    cost: int  # nano-dollars
    overrun: int  # what the cost exceeded the reservation by
    finished_at: datetime

    @property
    def reservation(self) -> int:
        return self.cost - self.overrun


@dataclass
class ReconcileReport:
    periods_checked: int = 0
    entries_checked: int = 0
    problems: list[str] = field(default_factory=list)
    overruns: list[Overrun] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# What an entry is due in a period of each unit (NULL: any amount, a tokens charge of an entry
# that reported no usage).
_EXPECTED = case(
    (B.c.unit == "usd", L.c.cost),
    (B.c.unit == "requests", literal_column("1")),
    (B.c.unit == "parallel", literal_column("0")),
    else_=case(
        (
            L.c.prompt_tokens.is_(None) & L.c.completion_tokens.is_(None),
            None,
        ),
        else_=func.coalesce(L.c.prompt_tokens, 0) + func.coalesce(L.c.completion_tokens, 0),
    ),
)

# Invariants that each row of a query breaks, and how each is reported.
_BROKEN: list[tuple[Select[Any], Callable[[Row[Any]], str]]] = [
    (
        # Every budget, whoever owns it; a retired one (its owner deleted, its limit removed)
        # has its last period closed and none open.
        select(B.c.id, B.c.retired_at, func.count(P.c.id).label("open"))
        .outerjoin(P, (P.c.budget_id == B.c.id) & P.c.closed_at.is_(None))
        .group_by(B.c.id, B.c.retired_at)
        .having(func.count(P.c.id) != case((B.c.retired_at.is_(None), 1), else_=0)),
        lambda b: (
            f"budget {b.id}: {b.open} open periods (expected exactly 1)"
            if b.retired_at is None
            else f"budget {b.id}: {b.open} open periods (expected none, it is retired)"
        ),
    ),
    (
        # Each charge is the entry's in the period's unit (unit_charge): its cost, its tokens
        # (any, when it reported none: what it held), one request, nothing for a parallel limit.
        select(C.c.request_id, C.c.period_id, C.c.amount, B.c.unit, _EXPECTED.label("expected"))
        .join(L, L.c.request_id == C.c.request_id)
        .join(P, P.c.id == C.c.period_id)
        .join(B, B.c.id == P.c.budget_id)
        .where(FINISHED, C.c.amount != func.coalesce(_EXPECTED, C.c.amount)),
        lambda w: (
            f"entry {w.request_id}: charged {w.amount} to period {w.period_id} "
            f"but it is due {w.expected} ({w.unit})"
        ),
    ),
    (
        select(C.c.request_id, P.c.budget_id, func.count().label("n"))
        .join(P, P.c.id == C.c.period_id)
        .group_by(C.c.request_id, P.c.budget_id)
        .having(func.count() > 1),
        lambda t: f"entry {t.request_id}: charged {t.n} times to budget {t.budget_id}",
    ),
    (
        select(L.c.request_id).where(PENDING, L.c.request_id.not_in(select(C.c.request_id))),
        lambda h: f"entry {h.request_id}: pending but holds no reservation",
    ),
]


async def reconcile(engine: AsyncEngine) -> ReconcileReport:
    """SPEC 6 invariants: each period's spend = the sum of its charges; its reserved = the sum
    of its open reservations; its spend at most the highest max_budget it admitted under plus
    the overruns recorded in it; exactly one open period per budget; no entry charged twice
    (each charge equals its entry's cost, at most once per period); every pending entry holds
    a reservation. The overruns are listed (they are recorded excess, not broken invariants)."""
    report = ReconcileReport()
    charged = (
        select(
            C.c.period_id,
            func.sum(C.c.amount).label("total"),
            func.sum(L.c.overrun).label("overruns"),
        )
        .join(L, L.c.request_id == C.c.request_id)
        .where(FINISHED)
        .group_by(C.c.period_id)
        .subquery()
    )
    held = (
        select(R.c.period_id, func.sum(R.c.amount).label("total"))
        .group_by(R.c.period_id)
        .subquery()
    )
    async with engine.connect() as conn:
        periods = (
            await conn.execute(
                select(
                    P.c.id,
                    P.c.budget_id,
                    P.c.spend,
                    P.c.reserved,
                    P.c.peak_max_budget,
                    func.coalesce(charged.c.total, 0).label("charged"),
                    func.coalesce(charged.c.overruns, 0).label("overruns"),
                    func.coalesce(held.c.total, 0).label("held"),
                )
                .outerjoin(charged, charged.c.period_id == P.c.id)
                .outerjoin(held, held.c.period_id == P.c.id)
            )
        ).all()
        report.periods_checked = len(periods)
        for p in periods:
            if p.spend != p.charged:
                report.problems.append(
                    f"period {p.id} (budget {p.budget_id}): spend {p.spend} nanos != "
                    f"sum of its ledger charges {p.charged}"
                )
            if p.reserved != p.held:
                report.problems.append(
                    f"period {p.id} (budget {p.budget_id}): reserved {p.reserved} nanos != "
                    f"sum of its open reservations {p.held}"
                )
            if p.spend < 0 or p.reserved < 0:
                report.problems.append(f"period {p.id}: negative spend or reserved")
            # On the charges (= the spend when the check above holds), so that a spend counter
            # altered by hand is one problem, not two.
            if p.peak_max_budget is not None and p.charged > p.peak_max_budget + p.overruns:
                report.problems.append(
                    f"period {p.id} (budget {p.budget_id}): spend {p.charged} nanos > max_budget "
                    f"{p.peak_max_budget} + the overruns recorded in it {p.overruns}"
                )

        report.entries_checked = (
            await conn.execute(select(func.count()).select_from(L))
        ).scalar_one()
        for query, describe in _BROKEN:
            report.problems.extend(describe(r) for r in (await conn.execute(query)).all())
        overruns = await conn.execute(
            select(L.c.request_id, L.c.key_id, L.c.cost, L.c.overrun, L.c.finished_at)
            .where(L.c.overrun > literal_column("0"))  # (the partial index's predicate)
            .order_by(L.c.finished_at, L.c.request_id)
        )
        report.overruns = [Overrun(*r) for r in overruns]
        await conn.rollback()
    return report

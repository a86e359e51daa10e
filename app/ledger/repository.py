"""Reading the ledger: entries, usage reports, and the invariant checks of `reconcile`."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Date, Table, cast, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.errors import InvalidField
from app.models import ApiKey, Budget, BudgetPeriod, LedgerCharge, LedgerEntry, Reservation

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


def encode_cursor(finished_at: datetime, request_id: str) -> str:
    raw = orjson.dumps([finished_at.isoformat(), request_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        stamp, request_id = orjson.loads(
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        )
        return datetime.fromisoformat(stamp), str(request_id)
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise InvalidField("cursor: not a cursor returned by this API", param="cursor") from None


@dataclass
class OpenBudget:
    key_id: str
    alias: str | None
    window: str  # the budget's duration, or "lifetime"
    spend: int
    max_budget: int | None


async def open_budgets(engine: AsyncEngine) -> list[OpenBudget]:
    """Every active key's budgets in their open periods (for the opt-in budget gauges)."""
    K: Table = ApiKey.__table__  # type: ignore[assignment]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(K.c.id, K.c.alias, B.c.budget_duration, P.c.spend, P.c.max_budget)
                .join(B, B.c.key_id == K.c.id)
                .join(P, P.c.budget_id == B.c.id)
                .where(K.c.status == "active", P.c.closed_at.is_(None))
                .order_by(K.c.id, B.c.kind, B.c.id)
            )
        ).all()
        await conn.rollback()
    return [
        OpenBudget(r.id, r.alias, r.budget_duration or "lifetime", r.spend, r.max_budget)
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
    q = (
        select(L)
        .where(FINISHED)
        .order_by(L.c.finished_at.desc(), L.c.request_id.desc())
        .limit(limit + 1)
    )
    if key_id is not None:
        q = q.where(L.c.key_id == key_id)
    if since is not None:
        q = q.where(L.c.finished_at >= since)
    if until is not None:
        q = q.where(L.c.finished_at < until)
    if cursor is not None:
        stamp, request_id = decode_cursor(cursor)
        q = q.where(
            or_(L.c.finished_at < stamp, (L.c.finished_at == stamp) & (L.c.request_id < request_id))
        )
    async with engine.connect() as conn:
        rows = list((await conn.execute(q)).all())
        await conn.rollback()
    page = rows[:limit]
    next_cursor = (
        encode_cursor(page[-1].finished_at, page[-1].request_id) if len(rows) > limit else None
    )
    return page, next_cursor


async def usage(
    engine: AsyncEngine, group_by: str, since: datetime | None, until: datetime | None
) -> list[dict[str, Any]]:
    group: Any
    if group_by == "key":
        group = L.c.key_id
    elif group_by == "model":
        group = L.c.model
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
    if since is not None:
        q = q.where(L.c.finished_at >= since)
    if until is not None:
        q = q.where(L.c.finished_at < until)
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

        open_counts = (
            await conn.execute(
                select(B.c.id, func.count(P.c.id).label("open"))
                .outerjoin(P, (P.c.budget_id == B.c.id) & P.c.closed_at.is_(None))
                .group_by(B.c.id)
            )
        ).all()
        for b in open_counts:
            if b.open != 1:
                report.problems.append(f"budget {b.id}: {b.open} open periods (expected exactly 1)")

        report.entries_checked = (
            await conn.execute(select(func.count()).select_from(L))
        ).scalar_one()
        wrong = (
            await conn.execute(
                select(C.c.request_id, C.c.period_id, C.c.amount, L.c.cost)
                .join(L, L.c.request_id == C.c.request_id)
                .where(C.c.amount != L.c.cost, FINISHED)
            )
        ).all()
        for w in wrong:
            report.problems.append(
                f"entry {w.request_id}: charged {w.amount} to period {w.period_id} but its cost is {w.cost}"
            )
        twice = (
            await conn.execute(
                select(C.c.request_id, P.c.budget_id, func.count().label("n"))
                .join(P, P.c.id == C.c.period_id)
                .group_by(C.c.request_id, P.c.budget_id)
                .having(func.count() > 1)
            )
        ).all()
        for t in twice:
            report.problems.append(
                f"entry {t.request_id}: charged {t.n} times to budget {t.budget_id}"
            )
        holding_nothing = (
            await conn.execute(
                select(L.c.request_id).where(PENDING, L.c.request_id.not_in(select(C.c.request_id)))
            )
        ).all()
        for h in holding_nothing:
            report.problems.append(f"entry {h.request_id}: pending but holds no reservation")
        overruns = await conn.execute(
            select(L.c.request_id, L.c.key_id, L.c.cost, L.c.overrun, L.c.finished_at)
            .where(L.c.overrun > literal_column("0"))  # (the partial index's predicate)
            .order_by(L.c.finished_at, L.c.request_id)
        )
        report.overruns = [Overrun(*r) for r in overruns]
        await conn.rollback()
    return report

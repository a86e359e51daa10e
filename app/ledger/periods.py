"""The budget SQL besides reserve and settle: roll, reset, sweep, open periods, read periods.

The request path's reserve and settle are the hot ledger's (app.ledger.contract), on the
database drivers. This module holds, on SQLAlchemy, what rolls (the scheduler's, and
`roll_periods` for the periods an admission found expired), resets, the admin API and the
sweeper need.

Every decision is a conditional UPDATE evaluated by the database, inside one short
transaction. PostgreSQL serialises concurrent writers on the period row (row lock +
re-evaluation of the WHERE clause); SQLite serialises whole transactions (BEGIN IMMEDIATE).
Lock order, to stay free of deadlocks: budget row, then period rows by ascending id.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Table,
    and_,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.budgets.periods import parse_duration
from app.budgets.schedule import Schedule
from app.budgets.state import PeriodState, unit_charge
from app.clock import Clock
from app.ledger.contract import ConcurrentChange
from app.models import Budget, BudgetAlert, BudgetPeriod, LedgerCharge, LedgerEntry

P: Table = BudgetPeriod.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
L: Table = LedgerEntry.__table__  # type: ignore[assignment]
C: Table = LedgerCharge.__table__  # type: ignore[assignment]

A: Table = BudgetAlert.__table__  # type: ignore[assignment]
# Windows shorter than a day: seconds, minutes (not months), hours.
_SHORT_WINDOW = or_(
    B.c.budget_duration.like("%s"),
    B.c.budget_duration.like("%h"),
    and_(B.c.budget_duration.like("%m"), B.c.budget_duration.not_like("%mo")),
)

_PERIOD_COLS = (
    P.c.budget_id,
    P.c.id,
    P.c.period_start,
    P.c.period_end,
    P.c.max_budget,
    P.c.spend,
    P.c.reserved,
)


def schedule_of(row: Row[Any]) -> Schedule:
    """The schedule of a `budgets` row."""
    duration = parse_duration(row.budget_duration) if row.budget_duration else None
    return Schedule(duration, row.budget_timezone, row.schedule_anchor)


class BudgetRepository:
    def __init__(self, engine: AsyncEngine, clock: Clock, reservation_ttl_seconds: float) -> None:
        self.engine = engine
        self.clock = clock
        self.ttl = timedelta(seconds=reservation_ttl_seconds)

    # -- reads -----------------------------------------------------------------------------

    async def period_states(self, period_ids: list[int]) -> list[PeriodState]:
        """The current money of these periods (read-only; for headers on error responses)."""
        if not period_ids:
            return []
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(*_PERIOD_COLS).where(P.c.id.in_(period_ids)))).all()
            await conn.rollback()
        return [PeriodState.from_row(r._mapping) for r in rows]

    # -- periods ---------------------------------------------------------------------------

    async def lock_budget(self, conn: AsyncConnection, budget_id: str) -> Row[Any]:
        # Serialises roll/reset/PATCH of one budget on PostgreSQL; SQLite already holds the
        # database write lock (BEGIN IMMEDIATE) and ignores FOR UPDATE.
        # FOR NO KEY UPDATE, not FOR UPDATE: a period row updated twice in one transaction
        # (the old SQLAlchemy reserve's undo did) makes PostgreSQL re-check its foreign key with
        # FOR KEY SHARE on the budget row. FOR UPDATE conflicts with that, so a roll holding the
        # budget lock and waiting for the period row deadlocked with such a transaction.
        return (
            await conn.execute(select(B).where(B.c.id == budget_id).with_for_update(key_share=True))
        ).one()

    async def _open_period_id(self, conn: AsyncConnection, budget_id: str, now: datetime) -> int:
        for _ in range(5):
            row = (
                await conn.execute(
                    select(P.c.id, P.c.period_end).where(
                        P.c.budget_id == budget_id, P.c.closed_at.is_(None)
                    )
                )
            ).first()
            if row is None:  # only if a budget was created without one; open it now
                schedule = schedule_of(await self.lock_budget(conn, budget_id))
                return await self._open_period(conn, budget_id, now, schedule.current_end(now))
            if row.period_end is None or row.period_end > now:
                return int(row.id)
            await self._roll(conn, budget_id, row.id, now)
        raise ConcurrentChange(f"budget {budget_id}: no stable open period")

    async def _roll(
        self, conn: AsyncConnection, budget_id: str, period_id: int, now: datetime
    ) -> int:
        """Close an expired period and open the scheduled one containing `now` (periods missed
        while nobody looked are skipped). Idempotent: if another replica or the scheduler got
        there first, the open period it created is returned."""
        budget = await self.lock_budget(conn, budget_id)
        closed = await conn.execute(
            update(P)
            .where(P.c.id == period_id, P.c.closed_at.is_(None), P.c.period_end <= now)
            .values(closed_at=now, close_reason="expired")
        )
        if closed.rowcount != 1:
            return await self._open_period_id(conn, budget_id, now)
        schedule = schedule_of(budget)
        start, end = schedule.period_at(now)
        return await self._open_period(conn, budget_id, start, end)

    async def open_first_period(
        self, conn: AsyncConnection, budget_id: str, start: datetime, end: datetime | None
    ) -> int:
        return await self._open_period(conn, budget_id, start, end)

    async def _open_period(
        self, conn: AsyncConnection, budget_id: str, start: datetime, end: datetime | None
    ) -> int:
        # max_budget is read from the budget row in the same statement: the caller holds that
        # row's lock, so a concurrent PATCH lands either before (and is copied) or after (and
        # updates this open period).
        row = (
            await conn.execute(
                insert(P)
                .from_select(
                    [
                        "budget_id",
                        "period_start",
                        "period_end",
                        "max_budget",
                        "peak_max_budget",
                        "spend",
                        "reserved",
                    ],
                    select(
                        B.c.id,
                        literal(start, P.c.period_start.type),
                        literal(end, P.c.period_end.type),
                        B.c.max_budget,
                        B.c.max_budget,
                        literal(0),
                        literal(0),
                    ).where(B.c.id == budget_id),
                )
                .returning(P.c.id)
            )
        ).one()
        return int(row.id)

    async def open_period_ids(self, conn: AsyncConnection, budget_ids: list[str]) -> dict[str, int]:
        """Budget id -> id of its open period (to lock several periods in ascending order)."""
        if not budget_ids:
            return {}
        rows = await conn.execute(
            select(P.c.budget_id, P.c.id).where(
                P.c.budget_id.in_(budget_ids), P.c.closed_at.is_(None)
            )
        )
        return {r.budget_id: int(r.id) for r in rows}

    async def close_and_reopen(
        self, conn: AsyncConnection, budget_id: str, reason: str, schedule: Schedule
    ) -> None:
        """Manual reset: the open period closes now and a new one opens, ending at the same
        scheduled boundary. Never touches the budget's settings; the caller owns the
        transaction and has locked the budget."""
        now = self.clock.now()
        row = (
            await conn.execute(
                update(P)
                .where(P.c.budget_id == budget_id, P.c.closed_at.is_(None))
                .values(closed_at=now, close_reason=reason)
                .returning(P.c.period_end)
            )
        ).first()
        end = row.period_end if row is not None else None
        if end is None or end <= now:
            end = schedule.current_end(now)
        await self._open_period(conn, budget_id, now, end)

    async def rebound_open_period(
        self, conn: AsyncConnection, budget_id: str, new_schedule: Schedule
    ) -> None:
        """A schedule change (SPEC 5): the open period keeps its start, spend and reservations
        and ends at the new schedule's next boundary after now (a lifetime one: never). Only a
        reset or the period's end starts a period at 0: closing it here would let a change of
        timezone, anchor or duration spend the budget again. The caller owns the transaction
        and has locked the budget."""
        await conn.execute(
            update(P)
            .where(P.c.budget_id == budget_id, P.c.closed_at.is_(None))
            .values(period_end=new_schedule.current_end(self.clock.now()))
        )

    async def roll_expired_periods_of_keys(self, key_ids: list[str]) -> int:
        return await self.roll_expired_periods_of("key", key_ids)

    async def roll_expired_periods_of(self, owner_kind: str, owner_ids: list[str]) -> int:
        """Roll the owners' open periods whose end has passed, before they are shown or changed:
        a read must not report an exhausted budget until a reset time already gone, and a
        settings change must not rewrite a period that is over. Cheap when nothing is due."""
        if not owner_ids:
            return 0
        now = self.clock.now()
        async with self.engine.connect() as conn:
            due = (
                await conn.execute(
                    select(P.c.id, P.c.budget_id)
                    .join(B, B.c.id == P.c.budget_id)
                    .where(
                        B.c.owner_kind == owner_kind,
                        B.c.owner_id.in_(owner_ids),
                        P.c.closed_at.is_(None),
                        P.c.period_end <= now,
                    )
                    .order_by(P.c.id)
                )
            ).all()
            await conn.rollback()
        return await self.roll_periods([(budget_id, period_id) for period_id, budget_id in due])

    async def roll_periods(self, due: list[tuple[str, int]]) -> int:
        """Roll these (budget id, period id) if expired, each in its own short transaction, in
        the global lock order (budget id). Idempotent: a period already rolled is left alone."""
        now = self.clock.now()
        for budget_id, period_id in sorted(due):
            async with self.engine.begin() as conn:
                await self._roll(conn, budget_id, period_id, now)
        return len(due)

    async def close_expired_periods(self) -> int:
        """The scheduler's job: roll every open period whose end has passed. Safe to run in
        every replica at once (each roll is conditional) and as often as wanted."""
        now = self.clock.now()
        async with self.engine.connect() as conn:
            due = (
                await conn.execute(
                    select(P.c.id, P.c.budget_id)
                    .where(P.c.closed_at.is_(None), P.c.period_end <= now)
                    .order_by(P.c.id)
                    .limit(1000)
                )
            ).all()
            await conn.rollback()
        rolled = 0
        for period_id, budget_id in due:
            async with self.engine.begin() as conn:
                await self._roll(conn, budget_id, period_id, now)
                rolled += 1
        return rolled

    # -- compacting ------------------------------------------------------------------------

    async def compact_short_periods(self, limit: int = 500) -> int:
        """Merge the closed periods of windows shorter than a day (`30s`, `1m`, `1h`: rate
        limits) into one closed period per budget and UTC day, once the day is over, so that
        such a budget keeps a row a day, not one per minute. The merged period carries the sum
        of their spend and of the limits they admitted under (peak_max_budget), and their
        charges and alerts; a period still holding a reservation is left alone. Returns the
        periods merged away."""
        today = self.clock.now().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        day = func.date(P.c.period_start)
        async with self.engine.connect() as conn:
            groups = (
                await conn.execute(
                    select(P.c.budget_id, day.label("day"))
                    .join(B, B.c.id == P.c.budget_id)
                    .where(
                        _SHORT_WINDOW,
                        P.c.closed_at.is_not(None),
                        P.c.period_end <= today,
                        P.c.close_reason != "compacted",
                    )
                    .group_by(P.c.budget_id, day)
                    .having(func.count() > 1)
                    .limit(limit)
                )
            ).all()
            await conn.rollback()
        merged = 0
        for budget_id, group_day in groups:
            async with self.engine.begin() as conn:
                await self.lock_budget(conn, budget_id)
                rows = (
                    await conn.execute(
                        select(P)
                        .where(
                            P.c.budget_id == budget_id,
                            day == group_day,
                            P.c.closed_at.is_not(None),
                            P.c.period_end <= today,
                            P.c.close_reason != "compacted",
                            P.c.reserved == 0,
                        )
                        .order_by(P.c.id)
                        .with_for_update()
                    )
                ).all()
                if len(rows) < 2:
                    continue
                limits = [r.peak_max_budget or r.max_budget for r in rows]
                kept = (
                    await conn.execute(
                        insert(P)
                        .values(
                            budget_id=budget_id,
                            period_start=rows[0].period_start,
                            period_end=rows[-1].period_end,
                            max_budget=rows[-1].max_budget,
                            peak_max_budget=None if None in limits else sum(limits),
                            spend=sum(r.spend for r in rows),
                            reserved=0,
                            closed_at=rows[-1].closed_at,
                            close_reason="compacted",
                        )
                        .returning(P.c.id)
                    )
                ).scalar_one()
                ids = [r.id for r in rows]
                await conn.execute(update(C).where(C.c.period_id.in_(ids)).values(period_id=kept))
                await conn.execute(update(A).where(A.c.period_id.in_(ids)).values(period_id=kept))
                await conn.execute(delete(P).where(P.c.id.in_(ids)))
                merged += len(ids)
        return merged

    # -- sweeping --------------------------------------------------------------------------

    async def sweep_expired_reservations(self) -> int:
        """Settle the pending entries whose request never settled (its gateway died): each
        becomes `abandoned`, charged its full reservation (`cost_source=reservation`, SPEC 5):
        the upstream may have served and billed it, and the ledger must never count less than
        was spent. Found through the small partial index of pending entries. The entry's row
        is the claim: a settle racing with this finds it no longer pending, and vice versa.
        Due: past the deadline set at admission (a pending entry's finished_at), or older than
        the TTL configured now (so a replica restarted with a shorter TTL releases what a
        crashed one left sooner)."""
        now = self.clock.now()
        # A literal, not a parameter: the planner matches it to the partial index's predicate.
        pending = L.c.outcome == literal_column("'pending'")
        expired = or_(L.c.finished_at <= now, L.c.started_at <= now - self.ttl)
        async with self.engine.connect() as conn:
            due = (
                (await conn.execute(select(L.c.request_id).where(pending, expired).limit(1000)))
                .scalars()
                .all()
            )
            await conn.rollback()
        swept = 0
        for request_id in due:
            async with self.engine.begin() as conn:
                # (the same dollars are held in each of the request's dollar periods)
                held = (
                    select(func.min(C.c.amount))
                    .join(P, P.c.id == C.c.period_id)
                    .join(B, B.c.id == P.c.budget_id)
                    .where(C.c.request_id == request_id, B.c.unit == "usd")
                )
                cost = (
                    await conn.execute(
                        update(L)
                        .where(L.c.request_id == request_id, pending, expired)
                        .values(
                            outcome="abandoned",
                            cost=func.coalesce(held.scalar_subquery(), 0),
                            cost_source="reservation",
                            overrun=0,
                            finished_at=now,
                        )
                        .returning(L.c.cost)
                    )
                ).scalar_one_or_none()
                if cost is None:
                    continue
                charges = (
                    await conn.execute(
                        select(C.c.period_id, C.c.amount, B.c.unit)
                        .join(P, P.c.id == C.c.period_id)
                        .join(B, B.c.id == P.c.budget_id)
                        .where(C.c.request_id == request_id)
                        .order_by(C.c.period_id)
                    )
                ).all()
                for c in charges:
                    charge = unit_charge(c.unit, cost, None, c.amount)
                    await conn.execute(
                        update(P)
                        .where(P.c.id == c.period_id)
                        .values(reserved=P.c.reserved - c.amount, spend=P.c.spend + charge)
                    )
                    await conn.execute(
                        update(C)
                        .where(C.c.request_id == request_id, C.c.period_id == c.period_id)
                        .values(amount=charge)
                    )
                swept += 1
        return swept

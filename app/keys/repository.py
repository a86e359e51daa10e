"""SQL for keys and their budgets (the money itself is moved by app.ledger.periods)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, case, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from app.budgets.state import BudgetRef
from app.ledger.contract import KeyContext
from app.models import ApiKey, Budget, BudgetPeriod, Owner

K: Table = ApiKey.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
P: Table = BudgetPeriod.__table__  # type: ignore[assignment]
OWN: Table = Owner.__table__  # type: ignore[assignment]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


_AUTH_QUERY = (
    select(
        K.c.id,
        K.c.alias,
        K.c.key_prefix,
        K.c.status,
        K.c.models,
        K.c.expires_at,
        K.c.shrink_to_fit,
        B.c.id.label("budget_id"),
        B.c.kind,
        P.c.id.label("period_id"),
        P.c.period_end,
    )
    .select_from(K)
    .outerjoin(B, B.c.key_id == K.c.id)
    .outerjoin(P, and_(P.c.budget_id == B.c.id, P.c.closed_at.is_(None)))
)


async def find_key_by_hash(conn: AsyncConnection, key_hash: str) -> KeyContext | None:
    """Key, budgets and open periods in one query (authentication + what admission needs)."""
    rows = (await conn.execute(_AUTH_QUERY.where(K.c.key_hash == key_hash))).all()
    if not rows:
        return None
    first = rows[0]
    budgets = [
        BudgetRef(r.budget_id, r.kind, r.period_id, r.period_end)
        for r in rows
        if r.budget_id is not None and r.period_id is not None
    ]
    return KeyContext(
        first.id,
        first.alias,
        first.key_prefix,
        first.status,
        first.models or [],
        first.expires_at,
        budgets,
        first.shrink_to_fit,
    )


async def insert_key(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(K).values(**values))


async def insert_budget(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(B).values(**values))


async def key_hash_exists(conn: AsyncConnection, key_hash: str) -> bool:
    return (await conn.execute(select(K.c.id).where(K.c.key_hash == key_hash))).first() is not None


async def get_key(conn: AsyncConnection, key_id: str) -> Row[Any] | None:
    return (await conn.execute(select(K).where(K.c.id == key_id))).first()


async def list_keys(
    conn: AsyncConnection,
    alias: str | None,
    after_id: str | None,
    limit: int,
    team_id: str | None = None,
) -> list[Row[Any]]:
    q = select(K).order_by(K.c.id).limit(limit)
    if alias is not None:
        q = q.where(K.c.alias == alias)
    if team_id is not None:
        q = q.where(K.c.team_id == team_id)
    if after_id is not None:
        q = q.where(K.c.id > after_id)
    return list((await conn.execute(q)).all())


async def update_key(conn: AsyncConnection, key_id: str, values: dict[str, Any]) -> None:
    await conn.execute(update(K).where(K.c.id == key_id).values(**values))


def _active_budgets_of(owner_kind: str, owner_ids: list[str]) -> Any:
    """The owners' budgets that still apply (not retired)."""
    return and_(B.c.owner_kind == owner_kind, B.c.owner_id.in_(owner_ids), B.c.retired_at.is_(None))


async def budgets_with_open_periods(
    conn: AsyncConnection, owner_ids: list[str], owner_kind: str = "key"
) -> list[Row[Any]]:
    """Each active budget of the owners (keys by default) with its open period's money,
    primary budget first."""
    q = (
        select(
            B,
            P.c.id.label("period_id"),
            P.c.period_start,
            P.c.period_end,
            P.c.spend,
            P.c.reserved,
        )
        .select_from(B)
        .outerjoin(P, and_(P.c.budget_id == B.c.id, P.c.closed_at.is_(None)))
        .where(_active_budgets_of(owner_kind, owner_ids))
        # "primary" > "parallel" > "window"
        .order_by(B.c.owner_id, B.c.kind.desc(), B.c.created_at, B.c.id)
    )
    return list((await conn.execute(q)).all())


async def primary_budget_id(
    conn: AsyncConnection, owner_id: str, owner_kind: str = "key"
) -> str | None:
    q = select(B.c.id).where(_active_budgets_of(owner_kind, [owner_id]), B.c.kind == "primary")
    row = (await conn.execute(q)).first()
    return None if row is None else str(row.id)


async def parallel_budget_id(conn: AsyncConnection, owner_kind: str, owner_id: str) -> str | None:
    q = select(B.c.id).where(_active_budgets_of(owner_kind, [owner_id]), B.c.kind == "parallel")
    row = (await conn.execute(q)).first()
    return None if row is None else str(row.id)


async def budget_ids(
    conn: AsyncConnection,
    owner_id: str,
    owner_kind: str = "key",
    kinds: tuple[str, ...] = ("primary", "window"),
) -> list[str]:
    """The owner's active budgets of these kinds, by id (the ledger's lock order)."""
    q = select(B.c.id).where(_active_budgets_of(owner_kind, [owner_id]), B.c.kind.in_(kinds))
    rows = await conn.execute(q.order_by(B.c.id))
    return [str(r) for r in rows.scalars()]


async def active_owner_exists(conn: AsyncConnection, kind: str, owner_id: str) -> bool:
    """A team or user a key may belong to: it exists and is not deleted."""
    q = select(OWN.c.id).where(OWN.c.id == owner_id, OWN.c.kind == kind, OWN.c.deleted_at.is_(None))
    return (await conn.execute(q)).first() is not None


async def update_budget(conn: AsyncConnection, budget_id: str, values: dict[str, Any]) -> None:
    await conn.execute(update(B).where(B.c.id == budget_id).values(**values))


async def update_open_period_limit(
    conn: AsyncConnection, budget_id: str, max_budget: int | None
) -> None:
    peak: Any = None  # unlimited now: the period's spend was never held to a limit since
    if max_budget is not None:
        peak = case(
            (P.c.peak_max_budget.is_(None), None),
            (P.c.peak_max_budget >= max_budget, P.c.peak_max_budget),
            else_=max_budget,
        )
    await conn.execute(
        update(P)
        .where(P.c.budget_id == budget_id, P.c.closed_at.is_(None))
        .values(max_budget=max_budget, peak_max_budget=peak)
    )


async def close_open_period(
    conn: AsyncConnection, budget_id: str, now: datetime, reason: str
) -> None:
    await conn.execute(
        update(P)
        .where(P.c.budget_id == budget_id, P.c.closed_at.is_(None))
        .values(closed_at=now, close_reason=reason)
    )

"""SQL for keys and their budgets (the money itself is moved by app.ledger.periods)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Table, and_, case, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from app.budgets.state import BudgetRef
from app.ledger.contract import KeyContext
from app.models import ApiKey, Budget, BudgetPeriod

K: Table = ApiKey.__table__  # type: ignore[assignment]
B: Table = Budget.__table__  # type: ignore[assignment]
P: Table = BudgetPeriod.__table__  # type: ignore[assignment]


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
    conn: AsyncConnection, alias: str | None, after_id: str | None, limit: int
) -> list[Row[Any]]:
    q = select(K).order_by(K.c.id).limit(limit)
    if alias is not None:
        q = q.where(K.c.alias == alias)
    if after_id is not None:
        q = q.where(K.c.id > after_id)
    return list((await conn.execute(q)).all())


async def update_key(conn: AsyncConnection, key_id: str, values: dict[str, Any]) -> None:
    await conn.execute(update(K).where(K.c.id == key_id).values(**values))


async def budgets_with_open_periods(conn: AsyncConnection, key_ids: list[str]) -> list[Row[Any]]:
    """Each budget of the keys with its open period's money, primary budget first."""
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
        .where(B.c.key_id.in_(key_ids))
        .order_by(B.c.key_id, B.c.kind.desc(), B.c.created_at, B.c.id)  # "primary" > "window"
    )
    return list((await conn.execute(q)).all())


async def primary_budget_id(conn: AsyncConnection, key_id: str) -> str | None:
    row = (
        await conn.execute(select(B.c.id).where(B.c.key_id == key_id, B.c.kind == "primary"))
    ).first()
    return None if row is None else str(row.id)


async def budget_ids(conn: AsyncConnection, key_id: str) -> list[str]:
    rows = await conn.execute(select(B.c.id).where(B.c.key_id == key_id).order_by(B.c.id))
    return [str(r) for r in rows.scalars()]


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


async def list_periods(conn: AsyncConnection, key_id: str, limit: int) -> list[Row[Any]]:
    q = (
        select(P, B.c.kind)
        .join(B, B.c.id == P.c.budget_id)
        .where(B.c.key_id == key_id)
        .order_by(P.c.period_start.desc(), P.c.id.desc())
        .limit(limit)
    )
    return list((await conn.execute(q)).all())

"""SQL for the `owners` table (their budgets' SQL is app.keys.repository's, by owner)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import ApiKey, Owner

OWN: Table = Owner.__table__  # type: ignore[assignment]
K: Table = ApiKey.__table__  # type: ignore[assignment]


async def insert_owner(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(OWN).values(**values))


async def insert_owner_if_new(conn: AsyncConnection, values: dict[str, Any]) -> bool:
    """Insert unless an owner of the same (kind, scope, name) exists; True if this inserted it.
    The unique constraint decides, so concurrent inserters on any number of processes agree."""
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = (
        dialect_insert(OWN)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["kind", "scope", "name"])
    )
    return (await conn.execute(statement)).rowcount == 1


async def find_owner(conn: AsyncConnection, kind: str, scope: str, name: str) -> Row[Any] | None:
    q = select(OWN).where(OWN.c.kind == kind, OWN.c.scope == scope, OWN.c.name == name)
    return (await conn.execute(q)).first()


async def get_owner(conn: AsyncConnection, kind: str, owner_id: str) -> Row[Any] | None:
    q = select(OWN).where(OWN.c.id == owner_id, OWN.c.kind == kind)
    return (await conn.execute(q)).first()


async def list_owners(
    conn: AsyncConnection,
    kind: str,
    after_id: str | None,
    limit: int,
    *,
    name: str | None = None,
    scope: str | None = None,
) -> list[Row[Any]]:
    """Owners of a kind, by id; deleted ones too (their history stays readable)."""
    q = select(OWN).where(OWN.c.kind == kind).order_by(OWN.c.id).limit(limit)
    given = [(OWN.c.name, name), (OWN.c.scope, scope)]
    q = q.where(*(column == value for column, value in given if value is not None))
    return list((await conn.execute(q if after_id is None else q.where(OWN.c.id > after_id))).all())


async def update_owner(conn: AsyncConnection, owner_id: str, values: dict[str, Any]) -> None:
    await conn.execute(update(OWN).where(OWN.c.id == owner_id).values(**values))


async def active_keys_of(conn: AsyncConnection, kind: str, owner_id: str) -> list[str]:
    """Ids of the active keys in a team or of a user (what stops its deletion)."""
    column = K.c.team_id if kind == "team" else K.c.user_id
    q = select(K.c.id).where(column == owner_id, K.c.status == "active").order_by(K.c.id)
    return [str(k) for k in (await conn.execute(q)).scalars()]


async def key_scope(conn: AsyncConnection, key_id: str) -> Any:
    """A key's team (with its end-user template) and its own end-user template; None for an
    unknown key."""
    q = (
        select(
            K.c.id,
            K.c.team_id,
            K.c.end_user_budget.label("key_template"),
            OWN.c.end_user_budget.label("team_template"),
        )
        .select_from(K)
        .outerjoin(OWN, OWN.c.id == K.c.team_id)
        .where(K.c.id == key_id)
    )
    return (await conn.execute(q)).first()


async def key_exists(conn: AsyncConnection, key_id: str) -> bool:
    return (await conn.execute(select(K.c.id).where(K.c.id == key_id))).first() is not None

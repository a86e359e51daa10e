"""End users on first sight (SPEC 11): the request path names an end user under a key; the
first time one is seen it is created, with the budgets of its team's (or its key's) template,
in one transaction, exactly once however many first requests race on however many processes."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import Clock
from app.keys.budgets import BudgetOwner
from app.keys.repository import new_id
from app.keys.schemas import BudgetEntry
from app.ledger.periods import BudgetRepository
from app.owners import repository as repo
from app.owners.service import create_owner_budgets, end_user_scope, template_budgets


async def ensure_end_user(engine: AsyncEngine, clock: Clock, key_id: str, name: str) -> str | None:
    """The id of the end user `name` seen under key `key_id`, created if new.

    Scope: the key's team (`team:<id>`), or the key (`key:<id>`) when it has none. A new end user
    gets the team's end_user_budget template -- or the key's, when the key has no team or its
    team has no template -- each budget with its first open period; without a template it gets
    no budget, but is still created so that usage can be grouped by it. An end user that exists
    (deleted ones too: their budgets stay retired) is returned as it is: a template applies on
    first sight only. None when the key does not exist.

    Concurrency: the insert is ON CONFLICT DO NOTHING on the unique (kind, scope, name); only the
    transaction whose insert went in creates the budgets, before it commits; the others read the
    committed row. So exactly one row, and one open period per template budget.
    """
    budgets = BudgetRepository(engine, clock, reservation_ttl_seconds=0)
    async with engine.connect() as conn:
        key = await repo.key_scope(conn, key_id)
        if key is None:
            await conn.rollback()
            return None
        scope = end_user_scope(key.team_id, key_id)
        existing = await repo.find_owner(conn, "end_user", scope, name)
        await conn.rollback()
    if existing is not None:
        return str(existing.id)
    stored = key.team_template if key.team_template is not None else key.key_template
    template = [BudgetEntry.model_validate(e) for e in stored or []]
    now = clock.now()
    owner_id = new_id("eu")
    async with engine.begin() as conn:
        inserted = await repo.insert_owner_if_new(
            conn,
            {
                "id": owner_id,
                "kind": "end_user",
                "scope": scope,
                "name": name,
                "metadata": {},
                "created_at": now,
                "updated_at": now,
            },
        )
        if inserted:
            primary, windows = template_budgets(template)
            owner = BudgetOwner("end_user", owner_id)
            await create_owner_budgets(conn, budgets, owner, primary, windows, now)
            return owner_id
        row = await repo.find_owner(conn, "end_user", scope, name)
    assert row is not None  # the conflicting row is committed: the unique constraint saw it
    return str(row.id)

"""Teams, users, end users and tags (SPEC 11): create, read, change, delete (softly), reset
and the periods of their budgets, as keys have them. The admin API and the CLI call this."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.errors import AppError, InvalidField, NotFound
from app.keys import budgets as owned
from app.keys import repository as budget_sql
from app.keys.repository import new_id
from app.keys.schemas import BudgetEntry, BudgetSettings, PeriodOut
from app.keys.service import id_after, template_of, template_out
from app.kit.cursors import encode_cursor
from app.ledger import repository as ledger
from app.ledger.periods import BudgetRepository
from app.ledger.reads import period_out
from app.owners import repository as repo
from app.owners.schemas import (
    EndUserCreate,
    EndUserOut,
    OwnerCreate,
    OwnerOut,
    OwnerUpdate,
    TagOut,
    TeamOut,
    UserOut,
)

# kind -> (id prefix, what the API calls it, the field naming it)
KINDS: dict[str, tuple[str, str, str]] = {
    "team": ("team", "team", "alias"),
    "user": ("user", "user", "alias"),
    "end_user": ("eu", "end user", "user"),
    "tag": ("tag", "tag", "name"),
}


class Conflict(AppError):
    status, type, code = 409, "invalid_request_error", "conflict"


def end_user_scope(team_id: str | None, key_id: str | None) -> str:
    """An end user's scope: its key's team, or the key when it has none."""
    return f"team:{team_id}" if team_id is not None else f"key:{key_id}"


async def create_owner_budgets(
    conn: AsyncConnection,
    budgets: BudgetRepository,
    owner: owned.BudgetOwner,
    primary: BudgetSettings | None,
    windows: list[BudgetEntry],
    now: datetime,
) -> None:
    if primary is not None:
        await owned.create_budget(conn, budgets, owner, "primary", primary, now)
    await owned.create_windows(conn, budgets, owner, windows, now)


def template_budgets(
    entries: list[BudgetEntry],
) -> tuple[BudgetSettings | None, list[BudgetEntry]]:
    """An end-user template as a primary budget (its first dollar budget on every model, which
    the end user's object shows flat) and windows (the rest)."""
    for i, e in enumerate(entries):
        if e.unit == "usd" and e.models is None:
            return e, entries[:i] + entries[i + 1 :]
    return None, entries


class OwnerService:
    def __init__(self, engine: AsyncEngine, budgets: BudgetRepository) -> None:
        self.engine = engine
        self.budgets = budgets
        self.clock = budgets.clock

    # -- create ----------------------------------------------------------------------------

    async def create(self, kind: str, body: OwnerCreate) -> OwnerOut:
        prefix, label, name_field = KINDS[kind]
        name = str(getattr(body, name_field))
        now = self.clock.now()
        owner_id = new_id(prefix)
        owner = owned.BudgetOwner(kind, owner_id)
        template = getattr(body, "end_user_budget", None)
        owned.check_template(template)
        async with self.engine.begin() as conn:
            scope = await self._scope_of(conn, body)
            inserted = await repo.insert_owner_if_new(
                conn,
                {
                    "id": owner_id,
                    "kind": kind,
                    "scope": scope,
                    "name": name,
                    "end_user_budget": template_of(template),
                    "metadata": body.metadata,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            if not inserted:
                existing = await repo.find_owner(conn, kind, scope, name)
                deleted = " (deleted, its history kept)" if existing and existing.deleted_at else ""
                raise Conflict(
                    f"{name_field}: a {label} named '{name}' already exists{deleted}"
                    + (f" in {scope}" if scope else ""),
                    param=name_field,
                )
            await create_owner_budgets(conn, self.budgets, owner, body, body.budgets, now)
            parallel = getattr(body, "max_parallel_requests", None)
            if parallel is not None:
                await owned.set_parallel_limit(conn, self.budgets, owner, parallel, now)
        return await self.get(kind, owner_id)

    @staticmethod
    async def _scope_of(conn: AsyncConnection, body: OwnerCreate) -> str:
        if not isinstance(body, EndUserCreate):
            return ""
        if body.team_id is not None:
            if not await budget_sql.active_owner_exists(conn, "team", body.team_id):
                raise InvalidField(f"team_id: no team with id '{body.team_id}'", param="team_id")
        elif body.key_id is not None and not await repo.key_exists(conn, body.key_id):
            raise InvalidField(f"key_id: no key with id '{body.key_id}'", param="key_id")
        return end_user_scope(body.team_id, body.key_id)

    # -- read ------------------------------------------------------------------------------

    async def get(self, kind: str, owner_id: str) -> OwnerOut:
        await self.budgets.roll_expired_periods_of(kind, [owner_id])  # show the current period
        async with self.engine.connect() as conn:
            row = await self._owner(conn, kind, owner_id)
            budgets = await budget_sql.budgets_with_open_periods(conn, [owner_id], kind)
            await conn.rollback()
        return render_owner(row, budgets)

    async def list_owners(
        self,
        kind: str,
        cursor: str | None,
        limit: int,
        *,
        name: str | None = None,
        scope: str | None = None,
    ) -> tuple[list[OwnerOut], str | None]:
        after = id_after(cursor, KINDS[kind][0]) if cursor else None
        async with self.engine.connect() as conn:
            rows = await repo.list_owners(conn, kind, after, limit + 1, name=name, scope=scope)
            await conn.rollback()
        page = rows[:limit]
        ids = [r.id for r in page]
        # Outside any held connection: the SQLite pool has only one.
        await self.budgets.roll_expired_periods_of(kind, ids)
        async with self.engine.connect() as conn:
            budgets = await budget_sql.budgets_with_open_periods(conn, ids, kind)
            await conn.rollback()
        by_owner: dict[str, list[Row[Any]]] = {}
        for b in budgets:
            by_owner.setdefault(b.owner_id, []).append(b)
        next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
        return [render_owner(r, by_owner.get(r.id, [])) for r in page], next_cursor

    async def periods(self, kind: str, owner_id: str, limit: int) -> list[PeriodOut]:
        await self.budgets.roll_expired_periods_of(kind, [owner_id])
        async with self.engine.connect() as conn:
            await self._owner(conn, kind, owner_id)
            await conn.rollback()
        rows = await ledger.owner_periods(self.engine, kind, owner_id, limit)
        return [PeriodOut.model_validate(period_out(r)) for r in rows]

    async def _owner(self, conn: AsyncConnection, kind: str, owner_id: str) -> Row[Any]:
        row = await repo.get_owner(conn, kind, owner_id)
        if row is None:
            raise NotFound(f"no {KINDS[kind][1]} with id '{owner_id}'")
        return row

    async def _live_owner(self, conn: AsyncConnection, kind: str, owner_id: str) -> Row[Any]:
        row = await self._owner(conn, kind, owner_id)
        if row.deleted_at is not None:
            raise Conflict(f"{KINDS[kind][1]} '{row.name}' ({owner_id}) has been deleted")
        return row

    # -- change ----------------------------------------------------------------------------

    async def update(self, kind: str, owner_id: str, body: OwnerUpdate) -> OwnerOut:
        changes = body.model_dump(exclude_unset=True)
        name_field = KINDS[kind][2]
        # A period that is over keeps the limit it was held to: roll it before changing.
        await self.budgets.roll_expired_periods_of(kind, [owner_id])
        now = self.clock.now()
        owner = owned.BudgetOwner(kind, owner_id)
        if "end_user_budget" in changes:
            owned.check_template(getattr(body, "end_user_budget", None))
        try:
            async with self.engine.begin() as conn:
                await self._live_owner(conn, kind, owner_id)
                values: dict[str, Any] = {"updated_at": now}
                if changes.get(name_field) is not None:
                    values["name"] = changes[name_field]
                if "metadata" in changes:
                    values["metadata"] = changes["metadata"] or {}
                if "end_user_budget" in changes:
                    values["end_user_budget"] = template_of(getattr(body, "end_user_budget", None))
                await repo.update_owner(conn, owner_id, values)
                await self._update_budgets(conn, owner, body, changes, now)
        except IntegrityError:
            raise Conflict(
                f"{name_field}: a {KINDS[kind][1]} named '{changes.get(name_field)}' "
                "already exists",
                param=name_field,
            ) from None
        return await self.get(kind, owner_id)

    async def _update_budgets(
        self,
        conn: AsyncConnection,
        owner: owned.BudgetOwner,
        body: OwnerUpdate,
        changes: dict[str, Any],
        now: datetime,
    ) -> None:
        if changes.keys() & owned.BUDGET_FIELDS:
            budget_id = await budget_sql.primary_budget_id(conn, owner.id, owner.kind)
            if budget_id is not None:
                await owned.update_budget(conn, self.budgets, budget_id, changes, now)
            else:  # an end user first seen without a template: its budget set explicitly
                settings = BudgetSettings.model_validate(
                    {k: v for k, v in changes.items() if k in owned.BUDGET_FIELDS and v is not None}
                )
                await owned.create_budget(conn, self.budgets, owner, "primary", settings, now)
        if body.budgets is not None:
            await owned.create_windows(conn, self.budgets, owner, body.budgets, now, replace=True)
        if "max_parallel_requests" in changes:
            await owned.set_parallel_limit(
                conn, self.budgets, owner, changes["max_parallel_requests"], now
            )

    async def delete(self, kind: str, owner_id: str) -> OwnerOut:
        """Soft: the owner is marked deleted and every budget of it retired (history kept). A
        team or user with active keys is not deleted: the keys are named."""
        now = self.clock.now()
        async with self.engine.begin() as conn:
            row = await self._owner(conn, kind, owner_id)
            if kind in ("team", "user"):
                keys = await repo.active_keys_of(conn, kind, owner_id)
                if keys:
                    raise Conflict(
                        f"{kind} '{row.name}' still has active keys: {', '.join(keys[:20])}"
                        + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")
                        + f"; revoke them or move them out of the {kind} first"
                    )
            if row.deleted_at is None:
                await repo.update_owner(conn, owner_id, {"deleted_at": now, "updated_at": now})
                for budget_id in await budget_sql.budget_ids(
                    conn, owner_id, kind, kinds=("primary", "window", "parallel")
                ):
                    await owned.retire_budget(conn, self.budgets, budget_id, now)
        return await self.get(kind, owner_id)

    async def reset(self, kind: str, owner_id: str) -> OwnerOut:
        """Manual reset of the owner's budgets, as a key's (SPEC 5)."""
        await self.budgets.roll_expired_periods_of(kind, [owner_id])  # reset the current period
        async with self.engine.begin() as conn:
            await self._live_owner(conn, kind, owner_id)
            await owned.reset_budgets(conn, self.budgets, owned.BudgetOwner(kind, owner_id))
        return await self.get(kind, owner_id)


def render_owner(row: Row[Any], budgets: list[Row[Any]]) -> OwnerOut:
    """The owner's object: its primary budget flat (null when it has none), its windows under
    `budgets`, and what its kind adds."""
    primary = next((owned.budget_out(b) for b in budgets if b.kind == "primary"), None)
    windows = [owned.budget_out(b) for b in budgets if b.kind == "window"]
    common: dict[str, Any] = {
        "id": row.id,
        "metadata": row.metadata or {},
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "deleted_at": row.deleted_at,
        "budgets": windows or None,
        "alert_at": [],
        "spend": 0.0,
        "reserved": 0.0,
    }
    if primary is not None:
        common.update(primary.model_dump(exclude={"budget_id", "unit", "models"}))
        common["reset_at"] = primary.reset_at
    if row.kind == "team":
        return TeamOut(
            **common,
            alias=row.name,
            max_parallel_requests=owned.parallel_limit(budgets),
            end_user_budget=template_out(row.end_user_budget),
        )
    if row.kind == "user":
        return UserOut(**common, alias=row.name)
    if row.kind == "tag":
        return TagOut(**common, name=row.name)
    scope_kind, _, scope_id = row.scope.partition(":")
    return EndUserOut(
        **common,
        user=row.name,
        team_id=scope_id if scope_kind == "team" else None,
        key_id=scope_id if scope_kind == "key" else None,
    )

"""Key lifecycle: issue or register, read, change, revoke, reset; and authentication."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.config import Settings
from app.errors import InvalidField, NotFound, Unauthorized
from app.keys import repository as repo
from app.keys.budgets import (
    BUDGET_FIELDS,
    BudgetOwner,
    budget_out,
    check_template,
    create_budget,
    create_windows,
    parallel_limit,
    reset_budgets,
    set_parallel_limit,
    update_budget,
)
from app.keys.repository import new_id
from app.keys.schemas import (
    BudgetEntry,
    KeyCreate,
    KeyCreated,
    KeyOut,
    KeyUpdate,
)
from app.kit.cursors import InvalidCursor, decode_cursor, encode_cursor
from app.kit.times import rfc3339
from app.ledger.contract import KeyContext, key_refusal
from app.ledger.periods import BudgetRepository

MANAGED_KEY_PREFIX = "sk-bg-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(key: str) -> str:
    return key[: min(10, len(key) // 3)]


class KeyService:
    def __init__(self, engine: AsyncEngine, budgets: BudgetRepository, settings: Settings) -> None:
        self.engine = engine
        self.budgets = budgets
        self.settings = settings
        self.clock = budgets.clock

    # -- authentication (request path) ------------------------------------------------------

    async def authenticate(self, presented: str | None) -> KeyContext:
        if not presented:
            raise Unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>', 'api-key' or 'x-api-key'"
            )
        async with self.engine.connect() as conn:
            ctx = await repo.find_key_by_hash(conn, hash_key(presented))
            await conn.rollback()
        return self.ensure_usable(ctx)

    def ensure_usable(self, ctx: KeyContext | None) -> KeyContext:
        """401 for an unknown, revoked or expired key."""
        reason = key_refusal(ctx, self.clock.now())
        if ctx is None or reason is not None:
            raise self.refused(ctx, reason or "unknown")
        return ctx

    @staticmethod
    def refused(ctx: KeyContext | None, reason: str) -> Unauthorized:
        """The 401 for a key that key_refusal refused for `reason` (unknown, revoked,
        expired)."""
        if ctx is None or reason == "unknown":
            return Unauthorized("invalid API key")
        if reason == "expired" and ctx.expires_at is not None:
            return Unauthorized(f"API key {ctx.label} expired at {rfc3339(ctx.expires_at)}")
        return Unauthorized(f"API key {ctx.label} has been revoked")

    # -- admin ------------------------------------------------------------------------------

    async def create(self, body: KeyCreate) -> KeyCreated:
        passthrough = self.settings.key_mode == "passthrough"
        if passthrough and body.key is None:
            raise InvalidField(
                "key: required in passthrough mode (the existing upstream key to budget)",
                param="key",
            )
        if not passthrough and body.key is not None:
            raise InvalidField(
                "key: only accepted in passthrough mode (BUDGETGATE_KEY_MODE=passthrough); "
                "in managed mode budgetgate issues the key",
                param="key",
            )
        plaintext = (
            body.key.get_secret_value()
            if body.key
            else MANAGED_KEY_PREFIX + secrets.token_urlsafe(32)
        )
        check_template(body.end_user_budget)
        now = self.clock.now()
        key_id = new_id("key")
        owner = BudgetOwner("key", key_id)
        async with self.engine.begin() as conn:
            await _check_owners(conn, body.team_id, body.user_id)
            if await repo.key_hash_exists(conn, hash_key(plaintext)):
                raise InvalidField("key: this key is already registered", param="key")
            await repo.insert_key(
                conn,
                {
                    "id": key_id,
                    "key_hash": hash_key(plaintext),
                    "key_prefix": display_prefix(plaintext),
                    "alias": body.alias,
                    "mode": self.settings.key_mode,
                    "status": "active",
                    "models": body.models,
                    "expires_at": body.expires_at,
                    "metadata": body.metadata,
                    "shrink_to_fit": body.shrink_to_fit,
                    "team_id": body.team_id,
                    "user_id": body.user_id,
                    "end_user_budget": template_of(body.end_user_budget),
                    "created_at": now,
                    "updated_at": now,
                    "revoked_at": None,
                },
            )
            await create_budget(conn, self.budgets, owner, "primary", body, now)
            await create_windows(conn, self.budgets, owner, body.budgets + body.model_budgets, now)
            if body.max_parallel_requests is not None:
                await set_parallel_limit(conn, self.budgets, owner, body.max_parallel_requests, now)
        out = await self.get(key_id)
        return KeyCreated(**out.model_dump(), key=plaintext)

    async def get(self, key_id: str) -> KeyOut:
        await self.budgets.roll_expired_periods_of_keys([key_id])  # show the current period
        async with self.engine.connect() as conn:
            key = await repo.get_key(conn, key_id)
            if key is None:
                raise NotFound(f"no key with id '{key_id}'")
            budgets = await repo.budgets_with_open_periods(conn, [key_id])
            await conn.rollback()
        return render_key(key, budgets, self.clock.now())

    async def list_keys(
        self, alias: str | None, cursor: str | None, limit: int, team_id: str | None = None
    ) -> tuple[list[KeyOut], str | None]:
        after = id_after(cursor, "key") if cursor else None
        async with self.engine.connect() as conn:
            keys = await repo.list_keys(conn, alias, after, limit + 1, team_id)
            await conn.rollback()
        page = keys[:limit]
        # Outside any held connection: the SQLite pool has only one.
        await self.budgets.roll_expired_periods_of_keys([k.id for k in page])
        async with self.engine.connect() as conn:
            budgets = await repo.budgets_with_open_periods(conn, [k.id for k in page])
            await conn.rollback()
        by_key: dict[str, list[Row[Any]]] = {}
        for b in budgets:
            by_key.setdefault(b.key_id, []).append(b)
        next_cursor = encode_cursor(page[-1].id) if len(keys) > limit else None
        now = self.clock.now()
        return [render_key(k, by_key.get(k.id, []), now) for k in page], next_cursor

    async def update(self, key_id: str, body: KeyUpdate) -> KeyOut:
        changes = body.model_dump(exclude_unset=True)
        check_template(body.end_user_budget)
        # A period that is over keeps the limit it was held to: roll it before changing.
        await self.budgets.roll_expired_periods_of_keys([key_id])
        now = self.clock.now()
        async with self.engine.begin() as conn:
            if await repo.get_key(conn, key_id) is None:
                raise NotFound(f"no key with id '{key_id}'")
            await _check_owners(conn, changes.get("team_id"), changes.get("user_id"))
            key_values: dict[str, Any] = {
                f: changes[f]
                for f in ("alias", "models", "expires_at", "shrink_to_fit", "team_id", "user_id")
                if f in changes
            }
            if "end_user_budget" in changes:
                key_values["end_user_budget"] = template_of(body.end_user_budget)
            if "metadata" in changes:
                key_values["metadata"] = changes["metadata"] or {}
            if "models" in key_values and key_values["models"] is None:
                key_values["models"] = []
            if key_values:
                await repo.update_key(conn, key_id, {**key_values, "updated_at": now})
            budget_id = await repo.primary_budget_id(conn, key_id)
            if budget_id is not None and changes.keys() & BUDGET_FIELDS:
                await update_budget(conn, self.budgets, budget_id, changes, now)
            owner = BudgetOwner("key", key_id)
            if "max_parallel_requests" in changes:
                await set_parallel_limit(conn, self.budgets, owner, body.max_parallel_requests, now)
            if body.budgets is not None or body.model_budgets is not None:
                windows = (body.budgets or []) + (body.model_budgets or [])
                await create_windows(conn, self.budgets, owner, windows, now, replace=True)
        return await self.get(key_id)

    async def revoke(self, key_id: str) -> KeyOut:
        now = self.clock.now()
        async with self.engine.begin() as conn:
            if await repo.get_key(conn, key_id) is None:
                raise NotFound(f"no key with id '{key_id}'")
            await repo.update_key(
                conn, key_id, {"status": "revoked", "revoked_at": now, "updated_at": now}
            )
        return await self.get(key_id)

    async def reset(self, key_id: str) -> KeyOut:
        """Manual reset of every budget of the key: each closes its current period early and
        opens one ending at the same scheduled boundary."""
        await self.budgets.roll_expired_periods_of_keys([key_id])  # reset the current period
        async with self.engine.begin() as conn:
            if await repo.get_key(conn, key_id) is None:
                raise NotFound(f"no key with id '{key_id}'")
            await reset_budgets(conn, self.budgets, BudgetOwner("key", key_id))
        return await self.get(key_id)


async def _check_owners(conn: AsyncConnection, team_id: str | None, user_id: str | None) -> None:
    """A key's team and user must exist and not be deleted."""
    for field, kind, owner_id in (("team_id", "team", team_id), ("user_id", "user", user_id)):
        if owner_id is not None and not await repo.active_owner_exists(conn, kind, owner_id):
            raise InvalidField(f"{field}: no {kind} with id '{owner_id}'", param=field)


def template_of(entries: list[BudgetEntry] | None) -> list[dict[str, Any]] | None:
    """An end-user template as stored (JSON: amounts as strings, exact)."""
    return None if entries is None else [e.model_dump(mode="json") for e in entries]


def template_out(stored: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """A stored end-user template as the API shows it (amounts as numbers)."""
    if stored is None:
        return None
    entries = [BudgetEntry.model_validate(e) for e in stored]
    return [
        {
            **e.model_dump(mode="json"),
            "max_budget": None if e.max_budget is None else float(e.max_budget),
            "soft_budget": None if e.soft_budget is None else float(e.soft_budget),
            "alert_at": [float(f) for f in e.alert_at or []],
        }
        for e in entries
    ]


def render_key(key: Row[Any], budgets: list[Row[Any]], now: datetime) -> KeyOut:
    """The key object; its status is "expired" (not stored: derived) once an active key's
    expires_at has passed."""
    expired = key.expires_at is not None and key.expires_at <= now
    primary = next(b for b in budgets if b.kind == "primary")
    windows = [budget_out(b) for b in budgets if b.kind == "window"]
    p = budget_out(primary)
    return KeyOut(
        id=key.id,
        alias=key.alias,
        key_prefix=key.key_prefix,
        status="expired" if key.status == "active" and expired else key.status,
        mode=key.mode,
        max_budget=p.max_budget,
        budget_duration=p.budget_duration,
        soft_budget=p.soft_budget,
        budget_timezone=p.budget_timezone,
        budget_anchor=p.budget_anchor,
        alert_at=p.alert_at,
        models=key.models or [],
        expires_at=key.expires_at,
        metadata=key.metadata or {},
        shrink_to_fit=key.shrink_to_fit,
        created_at=key.created_at,
        spend=p.spend,
        reserved=p.reserved,
        remaining=p.remaining,
        period_start=p.period_start,
        reset_at=p.reset_at,
        budgets=windows or None,
        team_id=key.team_id,
        user_id=key.user_id,
        max_parallel_requests=parallel_limit(budgets),
        end_user_budget=template_out(key.end_user_budget),
    )


def id_after(cursor: str, id_prefix: str) -> str:
    """The id a list cursor names (the last row of the page before), of this prefix."""
    try:
        (last_id,) = decode_cursor(cursor, 1)
    except InvalidCursor:
        last_id = ""
    if not last_id.startswith(f"{id_prefix}_"):
        raise InvalidField("cursor: not a cursor returned by this API", param="cursor")
    return last_id

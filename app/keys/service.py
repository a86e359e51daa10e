"""Key lifecycle: issue or register, read, change, revoke, reset; and authentication."""

from __future__ import annotations

import base64
import hashlib
import secrets
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.budgets.schedule import Schedule
from app.config import Settings
from app.errors import InvalidField, NotFound, Unauthorized
from app.keys import repository as repo
from app.keys.repository import new_id
from app.keys.schemas import (
    BudgetOut,
    BudgetSettings,
    KeyCreate,
    KeyCreated,
    KeyOut,
    KeyUpdate,
    PeriodOut,
)
from app.ledger.contract import KeyContext, key_refusal
from app.ledger.periods import BudgetRepository, schedule_of
from app.pricing.money import dollars_to_nanos

MANAGED_KEY_PREFIX = "sk-bg-"
SCHEDULE_FIELDS = ("budget_duration", "budget_timezone", "budget_anchor")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(key: str) -> str:
    return key[: min(10, len(key) // 3)]


def dollars(nanos: int | None) -> float | None:
    """Nano-dollars to a JSON number: exact for every amount the ledger holds (< 2^53 nanos
    would do; float's shortest repr gives back the 9-decimal value)."""
    return None if nanos is None else float(Decimal(nanos).scaleb(-9))


def _nanos(value: Decimal | None) -> int | None:
    return None if value is None else dollars_to_nanos(value, nearest=True)


def _basis_points(fractions: list[Decimal] | None) -> list[int] | None:
    """Alert thresholds as stored (app.models.Budget.alert_at_bp); none is NULL."""
    return [int(f.scaleb(4)) for f in fractions] if fractions else None


def _fractions(basis_points: list[int] | None) -> list[float]:
    return [float(Decimal(bp).scaleb(-4)) for bp in basis_points or []]


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
            return Unauthorized(f"API key {ctx.label} expired at {iso(ctx.expires_at)}")
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
        now = self.clock.now()
        key_id = new_id("key")
        async with self.engine.begin() as conn:
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
                    "created_at": now,
                    "updated_at": now,
                    "revoked_at": None,
                },
            )
            await self._create_budget(conn, key_id, "primary", body, now)
            for window in body.budgets:
                await self._create_budget(conn, key_id, "window", window, now)
        out = await self.get(key_id)
        return KeyCreated(**out.model_dump(), key=plaintext)

    async def _create_budget(
        self, conn: AsyncConnection, key_id: str, kind: str, s: BudgetSettings, now: datetime
    ) -> None:
        _check_soft(s.soft_budget, s.max_budget)
        _check_alert_at(s.alert_at, s.max_budget)
        schedule = Schedule.create(s.budget_duration, s.budget_timezone, s.budget_anchor, now)
        budget_id = new_id("bud")
        await repo.insert_budget(
            conn,
            {
                "id": budget_id,
                "owner_kind": "key",
                "owner_id": key_id,
                "key_id": key_id,
                "kind": kind,
                "max_budget": _nanos(s.max_budget),
                "soft_budget": _nanos(s.soft_budget),
                "alert_at_bp": _basis_points(s.alert_at),
                "budget_duration": s.budget_duration,
                "budget_timezone": s.budget_timezone,
                "budget_anchor": s.budget_anchor,
                "schedule_anchor": schedule.anchor,
                "created_at": now,
                "updated_at": now,
            },
        )
        start, end = schedule.period_at(now)
        await self.budgets.open_first_period(conn, budget_id, start, end)

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
        self, alias: str | None, cursor: str | None, limit: int
    ) -> tuple[list[KeyOut], str | None]:
        after = decode_cursor(cursor) if cursor else None
        async with self.engine.connect() as conn:
            keys = await repo.list_keys(conn, alias, after, limit + 1)
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
        # A period that is over keeps the limit it was held to: roll it before changing.
        await self.budgets.roll_expired_periods_of_keys([key_id])
        now = self.clock.now()
        async with self.engine.begin() as conn:
            if await repo.get_key(conn, key_id) is None:
                raise NotFound(f"no key with id '{key_id}'")
            key_values: dict[str, Any] = {
                f: changes[f]
                for f in ("alias", "models", "expires_at", "shrink_to_fit")
                if f in changes
            }
            if "metadata" in changes:
                key_values["metadata"] = changes["metadata"] or {}
            if "models" in key_values and key_values["models"] is None:
                key_values["models"] = []
            if key_values:
                await repo.update_key(conn, key_id, {**key_values, "updated_at": now})
            budget_id = await repo.primary_budget_id(conn, key_id)
            if budget_id is not None and changes.keys() & {
                "max_budget",
                "soft_budget",
                "alert_at",
                *SCHEDULE_FIELDS,
            }:
                await self._update_budget(conn, budget_id, changes, now)
        return await self.get(key_id)

    async def _update_budget(
        self, conn: AsyncConnection, budget_id: str, changes: dict[str, Any], now: datetime
    ) -> None:
        budget = await self.budgets.lock_budget(conn, budget_id)
        values: dict[str, Any] = {"updated_at": now}
        if "max_budget" in changes:
            values["max_budget"] = _nanos(changes["max_budget"])
        if "soft_budget" in changes:
            values["soft_budget"] = _nanos(changes["soft_budget"])
            # A soft budget set above the max is a mistake; a max lowered under the soft budget
            # is not (max_budget 0 freezes a key, whatever its soft budget).
            _check_soft(values["soft_budget"], values.get("max_budget", budget.max_budget))
        if "alert_at" in changes:
            values["alert_at_bp"] = _basis_points(changes["alert_at"])
            _check_alert_at(changes["alert_at"], values.get("max_budget", budget.max_budget))
        duration = changes.get("budget_duration", budget.budget_duration)
        timezone = changes.get("budget_timezone") or budget.budget_timezone
        anchor = changes.get("budget_anchor", budget.budget_anchor)
        # Re-sent but unchanged schedule settings are no change: re-deriving the default
        # anchor "as of now" would move it (1d, 30d, 1mo in a later month) and wipe the spend.
        if changes.keys() & set(SCHEDULE_FIELDS) and (duration, timezone, anchor) != (
            budget.budget_duration,
            budget.budget_timezone,
            budget.budget_anchor,
        ):
            schedule = Schedule.create(duration, timezone, anchor, now)
            values.update(
                budget_duration=duration,
                budget_timezone=timezone,
                budget_anchor=anchor,
                schedule_anchor=schedule.anchor,
            )
            if schedule != schedule_of(budget):
                await self.budgets.rebound_open_period(conn, budget_id, schedule)
        await repo.update_budget(conn, budget_id, values)
        if "max_budget" in values:
            await repo.update_open_period_limit(conn, budget_id, values["max_budget"])

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
            # The ledger's lock order: every budget row first (by id), then the period rows by
            # ascending id, as admission and settlement take them; else a reset deadlocks with
            # a request holding one of these periods.
            budgets = [
                await self.budgets.lock_budget(conn, budget_id)
                for budget_id in await repo.budget_ids(conn, key_id)
            ]
            open_ids = await self.budgets.open_period_ids(conn, [b.id for b in budgets])
            for budget in sorted(budgets, key=lambda b: open_ids.get(b.id, 0)):
                await self.budgets.close_and_reopen(conn, budget.id, "manual", schedule_of(budget))
        return await self.get(key_id)

    async def periods(self, key_id: str, limit: int) -> list[PeriodOut]:
        await self.budgets.roll_expired_periods_of_keys([key_id])
        async with self.engine.connect() as conn:
            if await repo.get_key(conn, key_id) is None:
                raise NotFound(f"no key with id '{key_id}'")
            rows = await repo.list_periods(conn, key_id, limit)
            await conn.rollback()
        return [
            PeriodOut(
                budget_id=r.budget_id,
                period_start=r.period_start,
                period_end=r.period_end,
                spend=dollars(r.spend) or 0.0,
                reserved=dollars(r.reserved) or 0.0,
                max_budget=dollars(r.max_budget),
                closed_at=r.closed_at,
                close_reason=r.close_reason,
            )
            for r in rows
        ]


def _check_soft(soft: Decimal | int | None, max_budget: Decimal | int | None) -> None:
    if soft is not None and max_budget is not None and soft > max_budget:
        raise InvalidField("soft_budget: must not be greater than max_budget", param="soft_budget")


def _check_alert_at(alert_at: list[Decimal] | None, max_budget: Decimal | int | None) -> None:
    """Thresholds on an unlimited budget would never fire: refused when set. (A limit removed
    later leaves them dormant until one is set again.)"""
    if alert_at and max_budget is None:
        raise InvalidField(
            "alert_at: thresholds are fractions of max_budget: set a max_budget too",
            param="alert_at",
        )


def iso(when: datetime) -> str:
    return (
        when.strftime("%Y-%m-%dT%H:%M:%SZ")
        if when.microsecond == 0
        else when.isoformat().replace("+00:00", "Z")
    )


def _budget_out(b: Row[Any]) -> BudgetOut:
    remaining = (
        None if b.max_budget is None else max(b.max_budget - (b.spend or 0) - (b.reserved or 0), 0)
    )
    return BudgetOut(
        budget_id=b.id,
        max_budget=dollars(b.max_budget),
        budget_duration=b.budget_duration,
        soft_budget=dollars(b.soft_budget),
        budget_timezone=b.budget_timezone,
        budget_anchor=b.budget_anchor,
        alert_at=_fractions(b.alert_at_bp),
        spend=dollars(b.spend or 0) or 0.0,
        reserved=dollars(b.reserved or 0) or 0.0,
        remaining=dollars(remaining),
        period_start=b.period_start,
        reset_at=b.period_end,
    )


def render_key(key: Row[Any], budgets: list[Row[Any]], now: datetime) -> KeyOut:
    """The key object; its status is "expired" (not stored: derived) once an active key's
    expires_at has passed."""
    expired = key.expires_at is not None and key.expires_at <= now
    primary = next(b for b in budgets if b.kind == "primary")
    windows = [_budget_out(b) for b in budgets if b.kind != "primary"]
    p = _budget_out(primary)
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
    )


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        key_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        key_id = ""
    if not key_id.startswith("key_"):  # cursors are key ids (encode_cursor)
        raise InvalidField("cursor: not a cursor returned by this API", param="cursor")
    return key_id

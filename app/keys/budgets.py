"""A budget row's life, whoever owns it (a key, a team, a user, an end user, a tag): create it
with its first open period, change its settings, retire it, reset it; and its amounts in its
unit (integer nano-dollars for usd, plain counts for tokens, requests and parallel)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from app.budgets.schedule import Schedule
from app.budgets.state import shown_amount
from app.errors import InvalidField
from app.keys import repository as repo
from app.keys.repository import new_id
from app.keys.schemas import BudgetEntry, BudgetOut, BudgetSettings
from app.ledger.periods import BudgetRepository, schedule_of
from app.pricing.money import dollars_to_nanos

SCHEDULE_FIELDS = ("budget_duration", "budget_timezone", "budget_anchor")
BUDGET_FIELDS = {"max_budget", "soft_budget", "alert_at", *SCHEDULE_FIELDS}


@dataclass(frozen=True)
class BudgetOwner:
    """Who a budget row belongs to: a key (owner_kind 'key', its id in key_id too, for the key's
    own queries) or an `owners` row (team, user, end_user, tag)."""

    kind: str
    id: str

    @property
    def key_id(self) -> str | None:
        return self.id if self.kind == "key" else None


def stored_amount(value: Decimal | int | None, unit: str, field: str) -> int | None:
    """An amount as the ledger stores it: nano-dollars for usd, a whole count otherwise."""
    if value is None:
        return None
    if unit == "usd":
        return dollars_to_nanos(Decimal(value), nearest=True)
    if Decimal(value) != Decimal(value).to_integral_value():
        raise InvalidField(f"{field}: a {unit} budget counts whole {unit}", param=field)
    return int(value)


def _basis_points(fractions: list[Decimal] | None) -> list[int] | None:
    """Alert thresholds as stored (app.models.Budget.alert_at_bp); none is NULL."""
    return [int(f.scaleb(4)) for f in fractions] if fractions else None


def _fractions(basis_points: list[int] | None) -> list[float]:
    return [float(Decimal(bp).scaleb(-4)) for bp in basis_points or []]


def check_soft(soft: Decimal | int | None, max_budget: Decimal | int | None) -> None:
    if soft is not None and max_budget is not None and soft > max_budget:
        raise InvalidField("soft_budget: must not be greater than max_budget", param="soft_budget")


def check_alert_at(alert_at: list[Decimal] | None, max_budget: Decimal | int | None) -> None:
    """Thresholds on an unlimited budget would never fire: refused when set. (A limit removed
    later leaves them dormant until one is set again.)"""
    if alert_at and max_budget is None:
        raise InvalidField(
            "alert_at: thresholds are fractions of max_budget: set a max_budget too",
            param="alert_at",
        )


def check_template(entries: list[BudgetEntry] | None) -> None:
    """An end-user template (`end_user_budget`) is checked when it is set, so that no end
    user's first request finds it invalid."""
    for i, e in enumerate(entries or []):
        try:
            check_soft(e.soft_budget, e.max_budget)
            check_alert_at(e.alert_at, e.max_budget)
            stored_amount(e.max_budget, e.unit, "max_budget")
            stored_amount(e.soft_budget, e.unit, "soft_budget")
        except InvalidField as exc:
            raise InvalidField(
                f"end_user_budget.{i}.{exc.message}", param="end_user_budget"
            ) from None


async def create_budget(
    conn: AsyncConnection,
    budgets: BudgetRepository,
    owner: BudgetOwner,
    kind: str,
    s: BudgetSettings,
    now: datetime,
    *,
    unit: str = "usd",
    models: list[str] | None = None,
) -> str:
    """Insert one budget of `owner` and open its first period, in the caller's transaction."""
    check_soft(s.soft_budget, s.max_budget)
    check_alert_at(s.alert_at, s.max_budget)
    schedule = Schedule.create(s.budget_duration, s.budget_timezone, s.budget_anchor, now)
    budget_id = new_id("bud")
    await repo.insert_budget(
        conn,
        {
            "id": budget_id,
            "owner_kind": owner.kind,
            "owner_id": owner.id,
            "key_id": owner.key_id,
            "kind": kind,
            "unit": unit,
            "models": models or None,
            "max_budget": stored_amount(s.max_budget, unit, "max_budget"),
            "soft_budget": stored_amount(s.soft_budget, unit, "soft_budget"),
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
    await budgets.open_first_period(conn, budget_id, start, end)
    return budget_id


async def create_windows(
    conn: AsyncConnection,
    budgets: BudgetRepository,
    owner: BudgetOwner,
    entries: list[BudgetEntry],
    now: datetime,
    *,
    replace: bool = False,
) -> None:
    """Extra windows (and model budgets: windows narrowed to models). `replace` (a PATCH of
    `budgets`): the owner's current windows are retired first (history kept); the new ones
    start at 0 in their current periods."""
    if replace:
        for budget_id in await repo.budget_ids(conn, owner.id, owner.kind, kinds=("window",)):
            await retire_budget(conn, budgets, budget_id, now)
    for entry in entries:
        await create_budget(
            conn, budgets, owner, "window", entry, now, unit=entry.unit, models=entry.models
        )


async def update_budget(
    conn: AsyncConnection,
    budgets: BudgetRepository,
    budget_id: str,
    changes: dict[str, Any],
    now: datetime,
) -> None:
    """Apply the BUDGET_FIELDS present in `changes` to one budget (SPEC 5: a new limit takes
    effect on the next request; a new schedule re-bounds the open period, keeping its spend)."""
    budget = await budgets.lock_budget(conn, budget_id)
    values: dict[str, Any] = {"updated_at": now}
    if "max_budget" in changes:
        values["max_budget"] = stored_amount(changes["max_budget"], budget.unit, "max_budget")
    if "soft_budget" in changes:
        values["soft_budget"] = stored_amount(changes["soft_budget"], budget.unit, "soft_budget")
        # A soft budget set above the max is a mistake; a max lowered under the soft budget
        # is not (max_budget 0 freezes a key, whatever its soft budget).
        check_soft(values["soft_budget"], values.get("max_budget", budget.max_budget))
    if "alert_at" in changes:
        values["alert_at_bp"] = _basis_points(changes["alert_at"])
        check_alert_at(changes["alert_at"], values.get("max_budget", budget.max_budget))
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
            await budgets.rebound_open_period(conn, budget_id, schedule)
    await repo.update_budget(conn, budget_id, values)
    if "max_budget" in values:
        await repo.update_open_period_limit(conn, budget_id, values["max_budget"])


async def retire_budget(
    conn: AsyncConnection, budgets: BudgetRepository, budget_id: str, now: datetime
) -> None:
    """The budget applies to nothing any more: retired, and its open period closed (reason
    'retired'), so that no admission finds it; its periods and charges stay as history."""
    await budgets.lock_budget(conn, budget_id)
    await repo.update_budget(conn, budget_id, {"retired_at": now, "updated_at": now})
    await repo.close_open_period(conn, budget_id, now, "retired")


async def set_parallel_limit(
    conn: AsyncConnection,
    budgets: BudgetRepository,
    owner: BudgetOwner,
    limit: int | None,
    now: datetime,
) -> None:
    """`max_parallel_requests`: a lifetime budget of kind and unit 'parallel' whose max_budget is
    the limit (requests in flight are reserved in it, never spent). None retires it."""
    budget_id = await repo.parallel_budget_id(conn, owner.kind, owner.id)
    if limit is None:
        if budget_id is not None:
            await retire_budget(conn, budgets, budget_id, now)
    elif budget_id is not None:
        await update_budget(conn, budgets, budget_id, {"max_budget": limit}, now)
    else:
        settings = BudgetSettings(max_budget=Decimal(limit))
        await create_budget(conn, budgets, owner, "parallel", settings, now, unit="parallel")


async def reset_budgets(
    conn: AsyncConnection, budgets: BudgetRepository, owner: BudgetOwner
) -> None:
    """Manual reset of the owner's budgets: each closes its current period early and opens one
    ending at the same scheduled boundary. The parallel limit is not reset: its open period
    counts the requests in flight, which a fresh period would forget."""
    # The ledger's lock order: every budget row first (by id), then the period rows by
    # ascending id, as admission and settlement take them; else a reset deadlocks with
    # a request holding one of these periods.
    rows = [
        await budgets.lock_budget(conn, budget_id)
        for budget_id in await repo.budget_ids(conn, owner.id, owner.kind)
    ]
    open_ids = await budgets.open_period_ids(conn, [b.id for b in rows])
    for budget in sorted(rows, key=lambda b: open_ids.get(b.id, 0)):
        await budgets.close_and_reopen(conn, budget.id, "manual", schedule_of(budget))


def budget_out(b: Row[Any]) -> BudgetOut:
    """One budget row (with its open period's money) as the API shows it."""
    remaining = (
        None if b.max_budget is None else max(b.max_budget - (b.spend or 0) - (b.reserved or 0), 0)
    )
    return BudgetOut(
        budget_id=b.id,
        unit=b.unit,
        models=b.models,
        max_budget=shown_amount(b.max_budget, b.unit),
        budget_duration=b.budget_duration,
        soft_budget=shown_amount(b.soft_budget, b.unit),
        budget_timezone=b.budget_timezone,
        budget_anchor=b.budget_anchor,
        alert_at=_fractions(b.alert_at_bp),
        spend=shown_amount(b.spend or 0, b.unit) or 0,
        reserved=shown_amount(b.reserved or 0, b.unit) or 0,
        remaining=shown_amount(remaining, b.unit),
        period_start=b.period_start,
        reset_at=b.period_end,
    )


def parallel_limit(budgets: list[Row[Any]]) -> int | None:
    """`max_parallel_requests` from an owner's active budget rows."""
    return next((int(b.max_budget) for b in budgets if b.kind == "parallel"), None)

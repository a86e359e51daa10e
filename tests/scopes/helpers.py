"""Owners and their budgets for the scope tests, written straight into the ledger database:
these tests are about what the request path does with them (SPEC 11)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert, text, update

from app.budgets.schedule import Schedule
from app.models import ApiKey, Budget, Owner
from tests.conftest import Gateway

NANOS = 1_000_000_000


async def owner(gw: Gateway, kind: str, name: str, scope: str = "") -> str:
    owner_id = f"{kind}_{uuid.uuid4().hex[:12]}"
    now = gw.clock.now()
    async with gw.state.engine.begin() as conn:
        await conn.execute(
            insert(Owner).values(
                id=owner_id, kind=kind, scope=scope, name=name, metadata_={},
                created_at=now, updated_at=now,
            )
        )  # fmt: skip
    return owner_id


async def budget(
    gw: Gateway,
    owner_kind: str,
    owner_id: str,
    max_budget: float | int | None,
    *,
    unit: str = "usd",
    duration: str | None = None,
    models: list[str] | None = None,
    kind: str = "window",
) -> str:
    """A budget of an owner (or, with owner_kind "key", of a key), with its first period.
    `max_budget`: dollars for usd, else a count."""
    now = gw.clock.now()
    schedule = Schedule.create(duration, "UTC", None, now)
    budget_id = f"bud_{uuid.uuid4().hex}"
    limit = None if max_budget is None else (
        round(max_budget * NANOS) if unit == "usd" else int(max_budget)
    )  # fmt: skip
    async with gw.state.engine.begin() as conn:
        await conn.execute(
            insert(Budget).values(
                id=budget_id, owner_kind=owner_kind, owner_id=owner_id,
                key_id=owner_id if owner_kind == "key" else None, kind=kind, unit=unit,
                models=models, max_budget=limit, budget_duration=duration,
                budget_timezone="UTC", schedule_anchor=schedule.anchor, created_at=now,
                updated_at=now,
            )
        )  # fmt: skip
        start, end = schedule.period_at(now)
        await gw.state.budgets.open_first_period(conn, budget_id, start, end)
    return budget_id


async def join(gw: Gateway, key_id: str, team_id: str | None = None, user_id: str | None = None):
    async with gw.state.engine.begin() as conn:
        await conn.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(team_id=team_id, user_id=user_id)
        )


async def set_limit(gw: Gateway, budget_id: str, max_budget: float) -> None:
    """A new max_budget for the budget and its open period (as the admin API changes it)."""
    nanos = round(max_budget * NANOS)
    async with gw.state.engine.begin() as conn:
        await conn.execute(
            text("UPDATE budgets SET max_budget = :m WHERE id = :b"), {"m": nanos, "b": budget_id}
        )
        await conn.execute(
            text(
                "UPDATE budget_periods SET max_budget = :m, peak_max_budget = "
                "CASE WHEN peak_max_budget IS NULL OR peak_max_budget < :m THEN :m "
                "ELSE peak_max_budget END WHERE budget_id = :b AND closed_at IS NULL"
            ),
            {"m": nanos, "b": budget_id},
        )


async def periods_of(gw: Gateway, budget_id: str) -> list[dict[str, Any]]:
    """The budget's periods, oldest first."""
    async with gw.state.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT id, spend, reserved, max_budget, closed_at FROM budget_periods "
                "WHERE budget_id = :b ORDER BY id"
            ),
            {"b": budget_id},
        )
        return [dict(r._mapping) for r in rows]


async def chat(gw: Gateway, key: str, *, tokens: int = 10, model: str = "bg-test", **headers: str):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens}
    sent = {"authorization": f"Bearer {key}"} | {k.replace("_", "-"): v for k, v in headers.items()}
    return await gw.client.post("/v1/chat/completions", json=body, headers=sent)

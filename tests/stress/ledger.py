"""Direct reads of the ledger tables (asyncpg), independent of the gateway's own code."""

from __future__ import annotations

from collections import Counter
from typing import Any

import asyncpg

CENT = 10_000_000  # $0.01 in nano-dollars: one bg-test request with max_tokens=10


def dsn(database_url: str) -> str:
    return database_url.replace("postgresql+asyncpg://", "postgresql://", 1)


class LedgerDB:
    def __init__(self, database_url: str) -> None:
        self.dsn = dsn(database_url)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.dsn, timeout=10)

    async def periods(self, key_ids: list[str]) -> list[asyncpg.Record]:
        return await self.fetch(PERIODS_SQL, key_ids)

    async def entries(self, key_ids: list[str]) -> list[asyncpg.Record]:
        """Every ledger entry of the keys with the period it was charged to (if any)."""
        return await self.fetch(
            """
            SELECT l.request_id, l.key_id, l.outcome, l.cost, l.cost_source, l.stream,
                   l.started_at, l.finished_at, c.period_id, c.amount,
                   p.period_start, p.period_end, p.closed_at
            FROM ledger_entries l
            LEFT JOIN ledger_charges c ON c.request_id = l.request_id
            LEFT JOIN budget_periods p ON p.id = c.period_id
            WHERE l.key_id = ANY($1::text[])
            """,
            key_ids,
        )

    async def reservations(self, key_ids: list[str] | None = None) -> list[asyncpg.Record]:
        if key_ids is None:
            return await self.fetch("SELECT * FROM reservations")
        return await self.fetch(
            "SELECT * FROM reservations WHERE key_id = ANY($1::text[])", key_ids
        )

    async def outcomes(self, key_ids: list[str]) -> dict[str, Counter[str]]:
        rows = await self.fetch(
            "SELECT key_id, outcome, count(*) AS n FROM ledger_entries "
            "WHERE key_id = ANY($1::text[]) GROUP BY key_id, outcome",
            key_ids,
        )
        out: dict[str, Counter[str]] = {k: Counter() for k in key_ids}
        for r in rows:
            out[r["key_id"]][r["outcome"]] = r["n"]
        return out


PERIODS_SQL = """
    SELECT b.key_id, p.budget_id, p.id, p.period_start, p.period_end, p.max_budget,
           p.spend, p.reserved, p.closed_at, p.close_reason
    FROM budget_periods p JOIN budgets b ON b.id = p.budget_id
    WHERE b.key_id = ANY($1::text[])
    ORDER BY p.budget_id, p.id
"""


def dollars(nanos: int | None) -> float | None:
    return None if nanos is None else nanos / 1e9

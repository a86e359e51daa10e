"""Ledger micro-benchmark: what authenticate / reserve / settle cost, in-process, one at a time.

For the ledger at BUDGETGATE_DATABASE_URL (a key created with the admin API or the CLI; pass
its plaintext with --key) it runs the gateway's own ledger steps, HotLedger.admit
(authenticate + reserve, app.ledger.contract) and HotLedger.settle, sequentially --iterations
times (and KeyService.authenticate, the SQLAlchemy lookup the admin API and free requests
still use) and reports wall and CPU (process_time: every thread of this process) per call.
With --raw it then runs the same statements on the bare driver (for SQLite: a plain `sqlite3`
connection in the calling thread, and aiosqlite; same PRAGMAs, BEGIN IMMEDIATE, same number
of transactions as the old SQLAlchemy path): the floor a leaner data layer could approach.

    BUDGETGATE_DATABASE_URL=sqlite+aiosqlite:////dev/shm/x.db \\
        .venv/bin/python bench/ledger_micro.py --key sk-bg-...
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stats(name: str, wall: list[float], cpu: list[float]) -> str:
    w = sorted(wall)
    return (
        f"  {name:<34} wall p50 {1e3 * w[len(w) // 2]:6.3f} ms  mean {1e3 * sum(w) / len(w):6.3f}"
        f"   cpu mean {1e3 * sum(cpu) / len(cpu):6.3f} ms"
    )


async def app_layer(key: str, n: int) -> tuple[list[str], Any]:
    from app.clock import SystemClock
    from app.config import get_settings
    from app.db import create_engine
    from app.keys.service import KeyService, hash_key
    from app.ledger.contract import (
        AdmitRequest,
        Admitted,
        Outcome,
        RequestInfo,
        create_hot_ledger,
    )
    from app.ledger.periods import BudgetRepository

    settings = get_settings()
    engine = create_engine(settings)
    clock = SystemClock()
    budgets = BudgetRepository(engine, clock, settings.reservation_ttl_seconds)
    keys = KeyService(engine, budgets, settings)
    hot = create_hot_ledger(settings)
    ttl = timedelta(seconds=settings.reservation_ttl_seconds)
    res: dict[str, tuple[list[float], list[float]]] = {
        k: ([], []) for k in ("authenticate", "admit (auth + reserve)", "settle")
    }

    async def timed(name: str, coro: Any) -> Any:
        w0, c0 = time.perf_counter(), time.process_time()
        out = await coro
        res[name][0].append(time.perf_counter() - w0)
        res[name][1].append(time.process_time() - c0)
        return out

    ctx = None
    for i in range(n + 50):
        if i == 50:  # warm-up done
            for w, c in res.values():
                w.clear()
                c.clear()
        ctx = await timed("authenticate", keys.authenticate(key))
        started = clock.now()
        rid = f"req_micro_{uuid.uuid4().hex}"
        admit = AdmitRequest(
            hash_key(key), rid, "bg-bench", "/chat/completions", False, 1000, started,
            started + ttl,
        )  # fmt: skip
        result = await timed("admit (auth + reserve)", hot.admit(admit, clock.now()))
        assert isinstance(result, Admitted), result
        info = RequestInfo(rid, ctx.id, "bg-bench", "/chat/completions", False, started)
        outcome = Outcome("ok", 500, "prices", 10, 16, 200)
        await timed("settle", hot.settle_soon(info, outcome, clock.now()))
    await hot.close()
    await engine.dispose()
    lines = [_stats(f"app: {k}", w, c) for k, (w, c) in res.items()]
    path = [k for k in res if k != "authenticate"]  # what the request path runs
    total_w = [sum(x) for x in zip(*(res[k][0] for k in path), strict=True)]
    total_c = [sum(x) for x in zip(*(res[k][1] for k in path), strict=True)]
    lines.append(_stats("app: admit + settle", total_w, total_c))
    return lines, ctx


AUTH_SQL = (
    "SELECT k.id, k.alias, k.key_prefix, k.status, k.models, k.expires_at, b.id, b.kind,"
    " p.id, p.period_end FROM api_keys k LEFT JOIN budgets b ON b.key_id = k.id"
    " LEFT JOIN budget_periods p ON p.budget_id = b.id AND p.closed_at IS NULL"
    " WHERE k.key_hash = ?"
)
RESERVE_SQL = (
    "UPDATE budget_periods SET reserved = reserved + ? WHERE id = ? AND closed_at IS NULL"
    " AND (max_budget IS NULL OR (spend + reserved < max_budget AND spend + reserved + ?"
    " <= max_budget)) RETURNING budget_id, id, period_start, period_end, max_budget,"
    " spend, reserved"
)
PENDING_SQL = (
    "INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost,"
    " cost_source, outcome, started_at, finished_at) VALUES (?, ?, ?, ?, ?, 0, 'none',"
    " 'pending', ?, ?)"
)
HOLD_SQL = "INSERT INTO ledger_charges (request_id, period_id, amount) VALUES (?, ?, ?)"
SPEND_SQL = (
    "UPDATE budget_periods SET reserved = reserved - ?, spend = spend + ? WHERE id = ?"
    " RETURNING budget_id, id, period_start, period_end, max_budget, spend, reserved"
)
SETTLE_ENTRY_SQL = (
    "UPDATE ledger_entries SET prompt_tokens = ?, completion_tokens = ?, cost = ?,"
    " cost_source = ?, outcome = ?, status_code = ?, finished_at = ?"
    " WHERE request_id = ? AND outcome = 'pending'"
)
SETTLE_CHARGE_SQL = "UPDATE ledger_charges SET amount = ? WHERE request_id = ? AND period_id = ?"


def _requests(key: str, ctx: Any, pg: bool) -> Any:
    """Per request: [(transaction: [(sql, params, fetch)])] -- what the app runs."""
    from app.keys.service import hash_key

    key_hash, period = hash_key(key), ctx.budgets[0].period_id

    def ts(d: datetime) -> Any:
        return d if pg else d.strftime("%Y-%m-%d %H:%M:%S.%f")

    while True:
        rid = f"req_raw_{uuid.uuid4().hex}"
        now = datetime.now(UTC)
        flag: Any = False if pg else 0
        yield [
            [(AUTH_SQL, (key_hash,), True)],
            [
                (RESERVE_SQL, (1000, period, 1000), True),
                (PENDING_SQL, (rid, ctx.id, "bg-bench", "/chat/completions", flag, ts(now),
                               ts(now + timedelta(seconds=900))), False),
                (HOLD_SQL, (rid, period, 1000), False),
            ],
            [
                (SPEND_SQL, (1000, 500, period), True),
                (SETTLE_ENTRY_SQL, (10, 16, 500, "prices", "ok", 200, ts(now), rid), False),
                (SETTLE_CHARGE_SQL, (500, rid, period), False),
            ],
        ]  # fmt: skip


def _pg_sql(sql: str) -> str:
    out, n = [], 0
    for ch in sql:
        if ch == "?":
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


def raw_sqlite(path: str, key: str, ctx: Any, n: int) -> list[str]:
    """The same transactions and statements on sqlite3 directly, in the calling thread."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        conn.execute(f"PRAGMA {pragma}")
    wall, cpu = [], []
    reqs = _requests(key, ctx, pg=False)
    for i in range(n + 50):
        if i == 50:
            wall.clear()
            cpu.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        for j, txn in enumerate(next(reqs)):
            conn.execute("BEGIN IMMEDIATE")
            for sql, params, fetch in txn:
                cur = conn.execute(sql, params)
                if fetch:
                    cur.fetchall()
            conn.execute("ROLLBACK" if j == 0 else "COMMIT")
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    conn.close()
    return [_stats("raw sqlite3 (sync, in the loop)", wall, cpu)]


async def raw_aiosqlite(path: str, key: str, ctx: Any, n: int) -> list[str]:
    """The same, through aiosqlite (one thread hop per statement) but without SQLAlchemy."""
    import aiosqlite

    db = await aiosqlite.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        await db.execute(f"PRAGMA {pragma}")
    wall, cpu = [], []
    reqs = _requests(key, ctx, pg=False)
    for i in range(n + 50):
        if i == 50:
            wall.clear()
            cpu.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        for j, txn in enumerate(next(reqs)):
            await db.execute("BEGIN IMMEDIATE")
            for sql, params, _fetch in txn:
                await db.execute_fetchall(sql, params)
            await db.execute("ROLLBACK" if j == 0 else "COMMIT")
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    await db.close()
    return [_stats("raw aiosqlite (no SQLAlchemy)", wall, cpu)]


async def raw_asyncpg(dsn: str, key: str, ctx: Any, n: int) -> list[str]:
    """The same transactions and statements on asyncpg directly (prepared, cached)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    wall, cpu = [], []
    reqs = _requests(key, ctx, pg=True)
    for i in range(n + 50):
        if i == 50:
            wall.clear()
            cpu.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        for txn in next(reqs):
            async with conn.transaction():
                for sql, params, _fetch in txn:
                    await conn.fetch(_pg_sql(sql), *params)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    await conn.close()
    return [_stats("raw asyncpg (no SQLAlchemy)", wall, cpu)]


def main() -> None:
    p = argparse.ArgumentParser(description="ledger micro-benchmark (see the module docstring)")
    p.add_argument("--key", required=True, help="plaintext API key of a key in that ledger")
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--raw", action="store_true", help="also the same SQL on the bare drivers")
    args = p.parse_args()
    import uvloop

    from app.config import get_settings

    lines, ctx = uvloop.run(app_layer(args.key, args.iterations))
    url = get_settings().database_url
    print(f"ledger micro-benchmark on {url} ({args.iterations} sequential requests):")
    for line in lines:
        print(line)
    if args.raw and url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        lines = raw_sqlite(path, args.key, ctx, args.iterations)
        lines += uvloop.run(raw_aiosqlite(path, args.key, ctx, args.iterations))
    elif args.raw:
        dsn = "postgresql://" + url.split("://", 1)[1]
        lines = uvloop.run(raw_asyncpg(dsn, args.key, ctx, args.iterations))
    else:
        lines = []
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()

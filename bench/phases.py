"""An instrumented gateway: `budgetgate serve`, plus per-request phase timings and DB counters.

Evidence for the profile's suggestions, without touching app/: it wraps, at import time, the
Gateway steps (authenticate, reserve, upstream send, body read, settle) with wall-clock
timers, and counts with SQLAlchemy engine events and an aiosqlite hook what each request
costs the ledger: SQL statements, transactions, pool checkouts, aiosqlite thread hops. On
SIGTERM/SIGINT it writes the numbers as JSON to --out (and prints a summary).

Run like `budgetgate serve` (same environment, same uvicorn settings), drive it with wrk,
stop it:

    BUDGETGATE_DATABASE_URL=... BUDGETGATE_UPSTREAM_URL=... \\
        .venv/bin/python bench/phases.py --port 8300 --out /tmp/phases.json

`bench/run.py --phases` does all of that at 1 and 32 connections.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TIMES: dict[str, list[float]] = defaultdict(list)
COUNTS: dict[str, int] = defaultdict(int)


def _timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t0)

    return wrapper


def _timed_gen(name: str, fn: Any) -> Any:
    """A relay generator: time from its first step to its end (settlement included)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            async for item in fn(*args, **kwargs):
                yield item
        finally:
            TIMES[name].append(time.perf_counter() - t0)

    return wrapper


def install() -> None:
    import aiosqlite.core
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    from app.keys import repository as keys_repo
    from app.keys import service as keys_service
    from app.ledger.postgres import PostgresHotLedger
    from app.ledger.sqlite import SqliteHotLedger
    from app.proxy import service as proxy_service
    from app.proxy import settlement as settlement_mod
    from app.proxy import upstream as upstream_mod

    G = proxy_service.Gateway
    G.handle = _timed("handle (to response object)", G.handle)
    G.authenticate = _timed("authenticate", G.authenticate)
    G._read_body = _timed("read body", G._read_body)
    G._admit = _timed("admit (authenticate + reserve)", G._admit)
    S = settlement_mod.Settlement
    S.settle = _timed("settle", S.settle)
    G._relay = _timed_gen("relay (stream + settle)", G._relay)
    U = upstream_mod.UpstreamClient
    U.send = _timed("upstream send (to headers)", U.send)
    KS = keys_service.KeyService
    KS.authenticate = _timed("  auth: KeyService.authenticate", KS.authenticate)
    keys_repo.find_key_by_hash = _timed("  auth: SELECT key+budgets", keys_repo.find_key_by_hash)
    # (settlement: HotLedger.settle_soon only queues it; "settle" above times it whole)
    for ledger in (SqliteHotLedger, PostgresHotLedger):
        ledger.admit = _timed("  admit: HotLedger.admit", ledger.admit)  # type: ignore[method-assign]

    orig_read = proxy_service.aiohttp.ClientResponse.read

    async def read(self: Any) -> bytes:
        t0 = time.perf_counter()
        try:
            return await orig_read(self)
        finally:
            TIMES["upstream body read"].append(time.perf_counter() - t0)

    proxy_service.aiohttp.ClientResponse.read = read  # type: ignore[method-assign]

    @event.listens_for(Engine, "before_cursor_execute")
    def _stmt(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        COUNTS["SQL statements (incl. BEGIN IMMEDIATE)"] += 1
        verb = statement.lstrip().split(None, 1)[0].upper()
        COUNTS[f"  {verb}"] += 1

    @event.listens_for(Engine, "begin")
    def _begin(conn: Any) -> None:
        COUNTS["transactions begun"] += 1

    @event.listens_for(Engine, "commit")
    def _commit(conn: Any) -> None:
        COUNTS["  commits"] += 1

    @event.listens_for(Engine, "rollback")
    def _rollback(conn: Any) -> None:
        COUNTS["  rollbacks"] += 1

    @event.listens_for(Pool, "checkout")
    def _checkout(*_: Any) -> None:
        COUNTS["pool checkouts"] += 1

    @event.listens_for(Pool, "reset")
    def _reset(*_: Any) -> None:
        COUNTS["pool resets (rollback on return)"] += 1

    orig_execute = aiosqlite.core.Connection._execute

    async def _execute(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        COUNTS["aiosqlite thread hops"] += 1
        return await orig_execute(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = _execute  # type: ignore[method-assign]

    from sqlalchemy.sql import compiler

    orig_init = compiler.SQLCompiler.__init__

    def _compile(self: Any, *args: Any, **kwargs: Any) -> None:
        COUNTS["SQL compilations (statement cache misses)"] += 1
        orig_init(self, *args, **kwargs)

    compiler.SQLCompiler.__init__ = _compile  # type: ignore[method-assign]


def summary(reset_from: dict[str, Any] | None = None) -> dict[str, Any]:
    n = len(TIMES.get("handle (to response object)", []))
    phases = {}
    for name, vals in TIMES.items():
        if not vals:
            continue
        s = sorted(vals)
        phases[name] = {
            "n": len(s),
            "mean_ms": 1e3 * sum(s) / len(s),
            "p50_ms": 1e3 * s[len(s) // 2],
            "p99_ms": 1e3 * s[min(len(s) - 1, int(len(s) * 0.99))],
        }
    per_request = {k: v / n for k, v in COUNTS.items()} if n else {}
    return {"requests": n, "phases": phases, "per_request": per_request}


def reset() -> None:
    TIMES.clear()
    COUNTS.clear()


def main() -> None:
    p = argparse.ArgumentParser(description="instrumented `budgetgate serve`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import uvicorn

    install()
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from app.main import create_app

    def factory() -> Any:
        app = create_app()

        # Control endpoints, added before the catch-all proxy route would match them.
        async def dump(request: Request) -> JSONResponse:
            out = summary()
            if request.query_params.get("reset"):
                reset()
            return JSONResponse(out)

        app.router.add_route("/__phases", dump, methods=["GET"])
        app.router.routes.insert(0, app.router.routes.pop())
        return app

    config = uvicorn.Config(
        factory,
        factory=True,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    finally:
        Path(args.out).write_text(json.dumps(summary(), indent=1))


if __name__ == "__main__":
    main()

"""Dashboard benchmark: the overview's server time on a big PostgreSQL ledger.

Starts a throwaway PostgreSQL cluster (tests/pgcluster.py), migrates it, seeds --keys keys
(each with a monthly budget and its open period) and --entries ledger entries spread over the
last 30 days (generate_series, in the database), rolls up the finished days as the scheduler
does, then serves the dashboard in-process (the gateway's app, httpx over ASGI: no network)
and times --rounds loads of each page after a warm-up. Prints the timings, and the plans of
the overview's live query (today's entries, through the finished_at index).

    .venv/bin/python bench/ui_overview.py                        # 10,000 keys, 1,000,000 entries
    .venv/bin/python bench/ui_overview.py --keys 1000 --entries 100000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADMIN_KEY = "bench-admin-key-0123456789abcdef"
MODELS = ["gpt-4o-mini", "gpt-4o", "gpt-4.1", "claude-sonnet", "claude-haiku", "gemini-flash"]


def seed_sql(keys: int, entries: int, now: datetime) -> str:
    """Keys, budgets, open periods and ledger entries, all generated in the database."""
    models = "ARRAY[" + ",".join(f"'{m}'" for m in MODELS) + "]"
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    next_month = (month + timedelta(days=32)).replace(day=1)
    stamp = now.isoformat()
    return f"""
INSERT INTO api_keys (id, key_hash, key_prefix, alias, mode, status, models, metadata,
                      created_at, updated_at)
SELECT 'key_' || lpad(i::text, 32, '0'), md5(i::text) || md5((i + 1)::text), 'sk-bg-' || i,
       'team-' || i, 'managed', CASE WHEN i % 50 = 0 THEN 'revoked' ELSE 'active' END,
       '[]', '{{}}', '{stamp}', '{stamp}'
FROM generate_series(1, {keys}) AS i;

INSERT INTO budgets (id, owner_id, key_id, kind, max_budget, budget_duration, budget_timezone,
                     schedule_anchor, created_at, updated_at)
SELECT 'bud_' || lpad(i::text, 32, '0'), 'key_' || lpad(i::text, 32, '0'),
       'key_' || lpad(i::text, 32, '0'), 'primary',
       CASE WHEN i % 10 = 0 THEN NULL ELSE (10 + i % 500)::bigint * 1000000000 END,
       '1mo', 'UTC', '{month.isoformat()}', '{stamp}', '{stamp}'
FROM generate_series(1, {keys}) AS i;

INSERT INTO budget_periods (budget_id, period_start, period_end, max_budget, peak_max_budget,
                            spend, reserved)
SELECT b.id, '{month.isoformat()}', '{next_month.isoformat()}', b.max_budget, b.max_budget,
       (random() * coalesce(b.max_budget, 100000000000))::bigint, 0
FROM budgets b;

INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, prompt_tokens,
                            completion_tokens, cost, overrun, cost_source, outcome, status_code,
                            started_at, finished_at)
SELECT 'req_' || lpad(i::text, 24, '0'),
       'key_' || lpad((1 + (i::bigint * 7919) % {keys})::text, 32, '0'),
       ({models})[1 + i % {len(MODELS)}],
       '/v1/chat/completions', i % 3 = 0, 100 + i % 900, 20 + i % 400,
       CASE WHEN i % 40 = 0 THEN 0 ELSE 1000 + (i % 97) * 123457 END,
       CASE WHEN i % 997 = 0 THEN 5000 ELSE 0 END,
       'prices', CASE WHEN i % 40 = 0 THEN 'rejected' ELSE 'ok' END,
       CASE WHEN i % 40 = 0 THEN 429 ELSE 200 END,
       t, t
FROM (SELECT i, timestamptz '{stamp}' - (i::double precision / {entries} * 30 * 86400)
                * interval '1 second' AS t
      FROM generate_series(1, {entries}) AS i) AS s;

ANALYZE;
"""


async def measure(url: str, rounds: int) -> dict[str, list[float]]:
    import httpx
    from asgi_lifespan import LifespanManager

    from app.config import Settings
    from app.main import create_app
    from app.ui.owners import standings
    from app.ui.reads import spend_by_key, usage_by

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,
        admin_key=ADMIN_KEY,
        upstream_url="http://127.0.0.1:9",
        log_level="warning",
    )
    app = create_app(settings, run_scheduler=False, migrate=False)
    pages = {
        "overview /ui/": "/ui/",
        "keys /ui/keys": "/ui/keys",
        "keys search ?q=team-12&status=near": "/ui/keys?q=team-12&status=near",
        "owner /ui/owners/key/…": "/ui/owners/key/key_" + "1".zfill(32),
        "usage 30 days by key": "/ui/usage?group_by=key",
        "usage 30 days by model": "/ui/usage?group_by=model",
        "ledger, first page": "/ui/ledger",
        "ledger, outcome=rejected": "/ui/ledger?outcome=rejected",
    }
    out: dict[str, list[float]] = {name: [] for name in pages}
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            login = await client.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf is not None
            r = await client.post("/ui/login", data={"csrf": csrf.group(1), "key": ADMIN_KEY})
            assert r.status_code == 303, r.text
            engine = app.state.engine
            since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            since -= timedelta(days=29)
            reads_of_the_overview = {
                "  the overview's standings (open periods)": lambda: standings(engine, 25),
                "  the overview's usage by day (rollup + today)": lambda: usage_by(
                    engine, "day", since, None
                ),
                "  the overview's usage by model (rollup + today)": lambda: usage_by(
                    engine, "model", since, None
                ),
                "  the overview's top spenders, 7 days (rollup + today)": lambda: spend_by_key(
                    engine, since + timedelta(days=23), None, limit=10
                ),
            }
            for name, read in reads_of_the_overview.items():
                out[name] = []
                for i in range(rounds + 2):
                    t0 = time.perf_counter()
                    await read()
                    if i >= 2:
                        out[name].append(time.perf_counter() - t0)
            for name, path in pages.items():
                for i in range(rounds + 2):
                    t0 = time.perf_counter()
                    r = await client.get(path)
                    elapsed = time.perf_counter() - t0
                    assert r.status_code == 200, (path, r.status_code, r.text[:300])
                    if i >= 2:  # two warm-up loads: connection pool, template compilation
                        out[name].append(elapsed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from app.ledger.usage_rollup import roll_up_finished_days
    from app.migrate import upgrade_to_head
    from tests.pgcluster import PgCluster

    now = datetime.now(UTC)
    with PgCluster() as cluster:
        url = cluster.create_database("bench_ui")
        upgrade_to_head(url)
        t0 = time.perf_counter()
        cluster.psql(seed_sql(args.keys, args.entries, now), dbname="bench_ui", timeout=1800)
        print(
            f"seeded {args.keys:,} keys and {args.entries:,} entries in {time.perf_counter() - t0:.1f} s"
        )

        async def rollup() -> int:
            from sqlalchemy.ext.asyncio import create_async_engine

            engine = create_async_engine(url)
            try:
                return await roll_up_finished_days(engine, now, timedelta(hours=1, minutes=15))
            finally:
                await engine.dispose()

        t0 = time.perf_counter()
        days = asyncio.run(rollup())
        print(
            f"rolled up {days} finished days in {time.perf_counter() - t0:.1f} s (once; then one day a day)"
        )
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        plan = cluster.psql(
            "EXPLAIN (ANALYZE, COSTS OFF) SELECT model, count(*), sum(cost) FROM ledger_entries "
            f"WHERE finished_at >= '{today.isoformat()}' GROUP BY model",
            dbname="bench_ui",
        )
        print(
            "the live tail (today's entries):\n"
            + "\n".join("    " + line for line in plan.splitlines())
        )
        timings = asyncio.run(measure(url, args.rounds))
    print(f"\nserver time per page load, in-process, {args.rounds} loads after 2 warm-ups:")
    for name, values in timings.items():
        ms = sorted(1e3 * v for v in values)
        print(
            f"  {name:<56} median {statistics.median(ms):7.1f} ms   "
            f"p95 {ms[int(0.95 * (len(ms) - 1))]:7.1f} ms   max {ms[-1]:7.1f} ms"
        )


if __name__ == "__main__":
    main()

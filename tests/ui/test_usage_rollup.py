"""The usage rollup and the dashboard's usage reads: whatever is rolled up or not, the figures
are the ledger's, equal to GET /admin/usage's; a day is rolled once, only when it is final."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from app.ledger import repository as ledger
from app.ledger.usage_rollup import live_since, roll_up_finished_days
from app.models import LedgerEntry, UsageDailyByKey, UsageDailyByModel, UsageRollupDay
from app.ui import reads
from tests.conftest import Gateway

GRACE = timedelta(hours=1)
NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


async def seed(gateway: Gateway, key_ids: list[str]) -> None:
    """Entries over 10 days, on day edges too, some without a model, some rejected or
    overrun."""
    engine = gateway.state.engine
    rows = []
    for d in range(10):
        day = datetime(2026, 1, 5, tzinfo=UTC) + timedelta(days=d)
        for i, offset in enumerate(
            (
                timedelta(0),
                timedelta(hours=7),
                timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
            )
        ):
            n = d * 10 + i
            rows.append(
                {
                    "request_id": f"req_seed_{n:04d}",
                    "key_id": key_ids[n % len(key_ids)],
                    "model": (None, "bg-test", "bg-priced")[n % 3],
                    "endpoint": "/v1/chat/completions",
                    "stream": False,
                    "prompt_tokens": None if n % 4 == 0 else 10 + n,
                    "completion_tokens": 5 * n,
                    "cost": 1_234_567 * (n + 1) + 1,
                    "overrun": 1000 if n % 7 == 0 else 0,
                    "cost_source": "prices",
                    "outcome": "rejected" if n % 5 == 0 else "ok",
                    "status_code": 429 if n % 5 == 0 else 200,
                    "started_at": day + offset,
                    "finished_at": day + offset,
                }
            )
    async with engine.begin() as conn:
        await conn.execute(insert(LedgerEntry.__table__), rows)


def as_api(rows: list[reads.UsageRow], group_by: str) -> list[dict]:
    return sorted(
        (
            {
                group_by: r.group,
                "requests": r.requests,
                "cost_nanos": r.spend,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
            }
            for r in rows
        ),
        key=lambda r: (r[group_by] is None, r[group_by] or ""),
    )


def api_sorted(rows: list[dict], group_by: str) -> list[dict]:
    return sorted(rows, key=lambda r: (r[group_by] is None, r[group_by] or ""))


RANGES = [
    (None, None),
    (datetime(2026, 1, 7, tzinfo=UTC), datetime(2026, 1, 12, tzinfo=UTC)),
    # partial days at both edges, and an edge inside the rolled-up days
    (datetime(2026, 1, 6, 5, tzinfo=UTC), datetime(2026, 1, 13, 8, tzinfo=UTC)),
    (datetime(2026, 1, 9, tzinfo=UTC), None),
    (None, datetime(2026, 1, 8, 12, tzinfo=UTC)),
    (datetime(2026, 1, 14, tzinfo=UTC), datetime(2026, 1, 15, tzinfo=UTC)),
]


async def one_key_from_the_ledger(
    engine: AsyncEngine, group_by: str, since: datetime | None, until: datetime | None, key: str
) -> list[dict]:
    """GET /admin/usage's figures for one key's entries (the admin API filters by no key)."""
    q = select(LedgerEntry.request_id).where(LedgerEntry.key_id == key)
    async with engine.connect() as conn:
        ids = set((await conn.execute(q)).scalars())
    rows = await ledger.usage(engine, group_by, since, until)
    if group_by == "key":
        return [r for r in rows if r["key"] == key]
    # per model / day for one key: sum the key's entries as the ledger holds them
    entries, _ = await ledger.list_entries(engine, key, since, until, 100_000, None)
    assert {e.request_id for e in entries} <= ids
    out: dict[str | None, dict] = {}
    for e in entries:
        g = e.model if group_by == "model" else e.finished_at.date().isoformat()
        r = out.setdefault(
            g,
            {
                group_by: g,
                "requests": 0,
                "cost_nanos": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            },
        )
        r["requests"] += 1
        r["cost_nanos"] += e.cost
        r["prompt_tokens"] += e.prompt_tokens or 0
        r["completion_tokens"] += e.completion_tokens or 0
    return api_sorted(list(out.values()), group_by)


async def assert_reads_equal_the_ledger(gateway: Gateway, key: str | None = None) -> None:
    engine = gateway.state.engine
    for since, until in RANGES:
        for group_by in reads.GROUPS:
            ours = as_api(await reads.usage_by(engine, group_by, since, until), group_by)
            theirs = api_sorted(await ledger.usage(engine, group_by, since, until), group_by)
            assert ours == theirs, (group_by, since, until)
            if group_by == "key" and since is not None and since == since.replace(hour=0):
                # the overview's top spenders: the same sums, biggest first
                top = await reads.spend_by_key(engine, since, until)
                assert [(t.key_id, t.requests, t.spend) for t in top] == sorted(
                    ((r["key"], r["requests"], r["cost_nanos"]) for r in theirs),
                    key=lambda r: (-r[2], r[0]),
                )
                assert await reads.spend_by_key(engine, since, until, [theirs[0]["key"]]) == [
                    t for t in top if t.key_id == theirs[0]["key"]
                ]
            if key is not None:
                ours = as_api(await reads.usage_by(engine, group_by, since, until, key), group_by)
                theirs = await one_key_from_the_ledger(engine, group_by, since, until, key)
                assert ours == theirs, (group_by, since, until, key)


async def test_usage_reads_equal_the_ledger_before_during_and_after_the_rollup(
    gateway: Gateway,
) -> None:
    created = [await gateway.create_key(alias=f"k{i}", max_budget=100) for i in range(3)]
    await seed(gateway, [k["id"] for k in created])
    engine = gateway.state.engine

    await assert_reads_equal_the_ledger(gateway, created[1]["id"])  # nothing rolled up: live

    # Up to Jan 10 only: a day is rolled once its end is GRACE in the past.
    assert await roll_up_finished_days(engine, datetime(2026, 1, 11, 0, 30, tzinfo=UTC), GRACE) == 5
    async with engine.connect() as conn:
        assert await live_since(conn) == datetime(2026, 1, 10, tzinfo=UTC)
    await assert_reads_equal_the_ledger(gateway, created[1]["id"])

    # Today's requests, through the gateway (its clock is at NOW): read live.
    for _ in range(3):
        assert (await gateway.chat(created[0]["key"])).status_code == 200

    assert await roll_up_finished_days(engine, NOW, GRACE) == 5  # Jan 10 .. Jan 14
    assert await roll_up_finished_days(engine, NOW, GRACE) == 0  # each day once
    async with engine.connect() as conn:
        assert await live_since(conn) == datetime(2026, 1, 15, tzinfo=UTC)
        by_key = (await conn.execute(select(func.sum(UsageDailyByKey.requests)))).scalar()
        by_model = (await conn.execute(select(func.sum(UsageDailyByModel.requests)))).scalar()
        entries = (await conn.execute(select(func.count()).select_from(LedgerEntry))).scalar()
    assert by_key == by_model == entries - 3  # today's three are not rolled up
    await assert_reads_equal_the_ledger(gateway, created[0]["id"])


async def test_a_day_is_rolled_up_once_by_racing_replicas(gateway: Gateway) -> None:
    key = (await gateway.create_key(alias="k", max_budget=100))["id"]
    await seed(gateway, [key])
    engine = gateway.state.engine
    results = await asyncio.gather(
        *(roll_up_finished_days(engine, NOW, GRACE) for _ in range(3)), return_exceptions=True
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    async with engine.connect() as conn:
        days = (
            (await conn.execute(select(UsageRollupDay.day).order_by(UsageRollupDay.day)))
            .scalars()
            .all()
        )
    assert [date.fromisoformat(str(d)) for d in days] == [
        date(2026, 1, 5) + timedelta(days=i) for i in range(10)
    ]
    await assert_reads_equal_the_ledger(gateway)


async def test_rejections_and_overruns_are_counted_per_day(gateway: Gateway) -> None:
    key = (await gateway.create_key(alias="k", max_budget=100))["id"]
    await seed(gateway, [key])
    engine = gateway.state.engine
    live = {r.group: r for r in await reads.usage_by(engine, "day", None, None)}
    await roll_up_finished_days(engine, NOW, GRACE)
    rolled = {r.group: r for r in await reads.usage_by(engine, "day", None, None)}
    assert live == rolled
    # Jan 5: entries 0, 1, 2: entry 0 is rejected and overran
    assert (rolled["2026-01-05"].rejections, rolled["2026-01-05"].overruns) == (1, 1)
    assert sum(r.rejections for r in rolled.values()) == len(
        [n for d in range(10) for n in (d * 10, d * 10 + 1, d * 10 + 2) if n % 5 == 0]
    )
    assert Decimal(rolled["2026-01-05"].spend) == sum(1_234_567 * (n + 1) + 1 for n in (0, 1, 2))

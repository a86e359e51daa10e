"""A request in flight is its ledger entry with outcome `pending`, its charges holding the
reservation; settlement turns both into the outcome and the cost in place, and nothing is
deleted per request (SPEC 5, 6; the soak benchmark's reason: bench/RESULTS.md)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
from alembic import command
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.clock import ManualClock
from app.ledger.contract import Outcome
from app.ledger.repository import reconcile
from app.migrate import alembic_config, upgrade_to_head
from app.models import LedgerCharge, LedgerEntry, Reservation
from tests.budgets.helpers import admit, assert_reconciled, get_key, ledger, settle
from tests.conftest import Gateway, make_settings, running_gateway
from tests.servers import ServerThread

PENDING_ENTRIES_REVISION = "0011"  # migrations/versions/…_pending_ledger_entries.py
CENTS_20 = 200_000_000  # $0.20 in nano-dollars
CENTS_5 = 50_000_000


async def rows(gw: Gateway, query: Any) -> list[Any]:
    async with gw.state.engine.connect() as conn:
        found = list((await conn.execute(query)).all())
        await conn.rollback()
    return found


async def test_in_flight_a_request_is_a_pending_entry_holding_its_reservation(
    gateway: Gateway,
) -> None:
    gw = gateway
    key = await gw.create_key(alias="inflight", max_budget=1.0, budget_duration="1mo")
    flight = await admit(gw, key["key"], CENTS_20)
    request_id = flight.info.request_id
    L, C = LedgerEntry.__table__, LedgerCharge.__table__

    [entry] = await rows(gw, select(L).where(L.c.request_id == request_id))
    assert (entry.outcome, entry.cost, entry.overrun) == ("pending", 0, 0)
    # While pending, finished_at is the time by which it must settle (the sweeper's clue).
    ttl = timedelta(seconds=gw.settings.reservation_ttl_seconds)
    assert entry.finished_at == flight.info.started_at + ttl
    [charge] = await rows(gw, select(C).where(C.c.request_id == request_id))
    assert charge.amount == CENTS_20
    [held] = await rows(gw, select(Reservation.__table__))
    assert (held.request_id, held.amount, held.expires_at) == (
        request_id,
        CENTS_20,
        entry.finished_at,
    )
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.2 and state["spend"] == 0.0
    # Not finished: neither listed nor counted in usage; reconcile counts it as reserved.
    assert await ledger(gw, key["id"]) == []
    r = await gw.admin("GET", "/admin/usage", params={"group_by": "key"})
    assert r.status_code == 200 and r.json()["data"] == [], r.text
    await assert_reconciled(gw)

    gw.clock.advance(timedelta(seconds=2))
    await settle(gw, flight.info, Outcome("ok", CENTS_5, "prices", 12, 5, 200))
    [entry] = await rows(gw, select(L).where(L.c.request_id == request_id))
    assert (entry.outcome, entry.cost, entry.cost_source, entry.status_code) == (
        "ok",
        CENTS_5,
        "prices",
        200,
    )
    assert entry.finished_at == flight.info.started_at + timedelta(seconds=2)
    assert [c.amount for c in await rows(gw, select(C).where(C.c.request_id == request_id))] == [
        CENTS_5
    ]
    assert await rows(gw, select(Reservation.__table__)) == []
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.0 and state["spend"] == 0.05
    [listed] = await ledger(gw, key["id"])
    assert listed["request_id"] == request_id and listed["outcome"] == "ok"
    await assert_reconciled(gw)

    # Settled once: a second settlement finds nothing pending and changes nothing.
    assert await settle(gw, flight.info, Outcome("ok", CENTS_20, "prices")) is None
    assert (await get_key(gw, key["id"]))["spend"] == 0.05


async def test_the_sweeper_finds_stale_pending_entries_by_their_deadline(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="stale", max_budget=1.0)
    early = await admit(gw, key["key"], CENTS_20)
    gw.clock.advance(timedelta(seconds=60))
    late = await admit(gw, key["key"], CENTS_5)
    ttl = timedelta(seconds=gw.settings.reservation_ttl_seconds)

    gw.clock.advance(ttl - timedelta(seconds=30))  # past the first one's deadline only
    assert await gw.state.budgets.sweep_expired_reservations() == 1
    by_id = {e["request_id"]: e for e in await ledger(gw, key["id"])}
    assert list(by_id) == [early.info.request_id]
    assert (by_id[early.info.request_id]["outcome"], by_id[early.info.request_id]["cost"]) == (
        "abandoned",
        0.2,
    )
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.05 and state["spend"] == 0.2
    await assert_reconciled(gw)

    # The late one settles normally; the early one's settlement comes too late to count.
    await settle(gw, late.info, Outcome("ok", CENTS_5, "prices"))
    assert await settle(gw, early.info, Outcome("ok", 1, "prices")) is None
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.0 and state["spend"] == 0.25
    assert await gw.state.budgets.sweep_expired_reservations() == 0
    await assert_reconciled(gw)


async def test_the_migration_moves_open_reservations_forward_and_back(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(database_url, mock_upstream.url)
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(alias="migrated", max_budget=1.0, budget_duration="1mo")
        flight = await admit(gw, key["key"], CENTS_20)
    request_id = flight.info.request_id

    # Back to separate reservations: the request holds one and has no entry yet.
    before = f"{PENDING_ENTRIES_REVISION}-1"
    await asyncio.to_thread(command.downgrade, alembic_config(database_url), before)
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            held = (await conn.execute(text("SELECT request_id, amount FROM reservations"))).all()
            entries = (await conn.execute(text("SELECT request_id FROM ledger_entries"))).all()
        assert [tuple(r) for r in held] == [(request_id, CENTS_20)]
        assert entries == []
    finally:
        await engine.dispose()

    # Forward again: the open reservation is a pending entry, settled as any other.
    await asyncio.to_thread(upgrade_to_head, database_url)
    async with running_gateway(settings, clock) as gw:
        L = LedgerEntry.__table__
        [entry] = await rows(gw, select(L).where(L.c.request_id == request_id))
        assert entry.outcome == "pending" and entry.started_at == flight.info.started_at
        assert (await get_key(gw, key["id"]))["reserved"] == 0.2
        await assert_reconciled(gw)
        await settle(gw, flight.info, Outcome("ok", CENTS_5, "prices"))
        state = await get_key(gw, key["id"])
        assert state["reserved"] == 0.0 and state["spend"] == 0.05
        report = await reconcile(gw.state.engine)
        assert report.ok and report.entries_checked == 1, report.problems


HOT_TABLES = ("ledger_entries", "ledger_charges", "budget_periods")


async def table_activity(dsn: str, expect_updates: int) -> dict[str, Any]:
    """pg_stat_user_tables of the request path's tables, once the gateway's backends have
    reported (they flush their counters when idle or at exit)."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(100):
            stats = {
                r["relname"]: r
                for r in await conn.fetch(
                    "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del "
                    "FROM pg_stat_user_tables"
                )
            }
            if all(stats[t]["n_tup_upd"] >= expect_updates for t in HOT_TABLES):
                return stats
            await asyncio.sleep(0.1)
        return stats
    finally:
        await conn.close()


async def test_no_row_is_deleted_per_request_and_charges_update_in_place(
    postgres_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    n = 30
    settings = make_settings(postgres_url, mock_upstream.url)
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(alias="hot", max_budget=100.0)
        for _ in range(n):
            r = await gw.chat(key["key"])
            assert r.status_code == 200, r.text
        await assert_reconciled(gw)
    # (the gateway has stopped: its database connections are closed, their counters reported)
    dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://")
    stats = await table_activity(dsn, n)
    deleted = {t: s["n_tup_del"] for t, s in stats.items() if s["n_tup_del"]}
    assert deleted == {}, "rows deleted while serving requests"
    assert stats["ledger_entries"]["n_tup_ins"] == n
    assert stats["ledger_entries"]["n_tup_upd"] == n  # pending -> ok, in place
    assert stats["ledger_charges"]["n_tup_ins"] == n
    assert stats["ledger_charges"]["n_tup_upd"] == n
    # No indexed column of a charge changes at settlement, and the fillfactor leaves room on
    # its page: PostgreSQL updates it without touching an index (HOT).
    assert stats["ledger_charges"]["n_tup_hot_upd"] > 0, dict(stats["ledger_charges"])
    assert stats["budget_periods"]["n_tup_hot_upd"] > 0, dict(stats["budget_periods"])

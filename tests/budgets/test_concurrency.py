"""Concurrency of admission, settlement and resets (SPEC 5 and 6; PEER-FAILURES "Concurrency").

Every test drives real concurrent transactions: on PostgreSQL through several pooled
connections (and, for the reset race, several engines standing in for replicas); on SQLite
through the one pooled connection plus extra engines on the same file (like the CLI would).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import ManualClock
from app.db import create_engine
from app.ledger.contract import Outcome
from app.ledger.periods import BudgetRepository
from app.ledger.repository import reconcile
from app.models import Budget, BudgetPeriod, LedgerCharge, LedgerEntry, Reservation
from app.scheduler import run_maintenance
from tests.budgets.helpers import Flight, admit, settle
from tests.conftest import START, Gateway, make_settings, running_gateway
from tests.servers import ServerThread

B = Budget.__table__
P = BudgetPeriod.__table__
C = LedgerCharge.__table__
L = LedgerEntry.__table__
R = Reservation.__table__

CENT = 10_000_000  # $0.01 in nano-dollars: the exact cost of one bg-test chat, max_tokens=10
PERIOD = timedelta(seconds=30)


# -- helpers ---------------------------------------------------------------------------------


@contextmanager
def peak_connections(engine: AsyncEngine) -> Iterator[list[int]]:
    """Track the most connections checked out of the engine's pool at once."""
    state = {"now": 0}
    peak = [0]

    def on_checkout(*_: Any) -> None:
        state["now"] += 1
        peak[0] = max(peak[0], state["now"])

    def on_checkin(*_: Any) -> None:
        state["now"] -= 1

    event.listen(engine.sync_engine, "checkout", on_checkout)
    event.listen(engine.sync_engine, "checkin", on_checkin)
    try:
        yield peak
    finally:
        event.remove(engine.sync_engine, "checkout", on_checkout)
        event.remove(engine.sync_engine, "checkin", on_checkin)


def batch_totals() -> tuple[float, float]:
    """Ledger steps and transactions on the request path so far (all gateways of the test
    process: compare before and after)."""
    return (
        REGISTRY.get_sample_value("budgetgate_ledger_batch_steps_sum") or 0.0,
        REGISTRY.get_sample_value("budgetgate_ledger_batch_steps_count") or 0.0,
    )


async def fetch(engine: AsyncEngine, query: Any) -> list[Any]:
    async with engine.connect() as conn:
        rows = list((await conn.execute(query)).all())
        await conn.rollback()
    return rows


async def periods_of(engine: AsyncEngine, budget_id: str) -> list[Any]:
    return await fetch(engine, select(P).where(P.c.budget_id == budget_id).order_by(P.c.id))


async def budget_ids(gw: Gateway, key_id: str) -> list[str]:
    """The key's primary budget first, then its windows in the order the API lists them."""
    key = (await gw.admin("GET", f"/admin/keys/{key_id}")).json()
    windows = [b["budget_id"] for b in key["budgets"] or []]
    rows = await fetch(gw.state.engine, select(B.c.id, B.c.kind).where(B.c.key_id == key_id))
    primary = [r.id for r in rows if r.kind == "primary"]
    assert len(primary) == 1 and len(rows) == 1 + len(windows)
    return primary + windows


async def ledger_of(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    r = await gw.admin("GET", "/admin/ledger", params={"key_id": key_id, "limit": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["next_cursor"] is None
    return body["data"]


async def assert_reconciles(engine: AsyncEngine) -> None:
    report = await reconcile(engine)
    assert report.ok, report.problems


async def gather_all(aws: list[Any]) -> list[Any]:
    """Run everything at once; fail on any exception (deadlock, serialization error, ...)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} tasks failed, first: {errors[0]!r}"
    return results


def assert_statuses(responses: list[Any], ok: int, rejected: int) -> None:
    counts = Counter(r.status_code for r in responses)
    assert counts == {200: ok, 429: rejected}, (
        counts,
        [r.text for r in responses if r.status_code not in (200, 429)][:3],
    )
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["type"] == "budget_exceeded", r.text


@pytest.fixture
async def gw(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> AsyncIterator[Gateway]:
    """A gateway with a pool large enough for truly parallel transactions on PostgreSQL."""
    settings = make_settings(database_url, mock_upstream.url, db_pool_size=20)
    async with running_gateway(settings, clock) as g:
        yield g


# -- 1. one budget, 100 concurrent requests ---------------------------------------------------


async def test_100_concurrent_requests_admit_exactly_what_fits(gw: Gateway) -> None:
    key = await gw.create_key(alias="race", max_budget=0.37)
    steps, batches = batch_totals()
    responses = await gather_all([gw.chat(key["key"], max_tokens=10) for _ in range(100)])
    assert_statuses(responses, ok=37, rejected=63)
    # The race must be real: admissions were in flight at once, so the request path's group
    # commit (app.ledger.contract) ran some of the 137 steps (100 admits, 37 settles) together
    # in one transaction.
    steps_after, batches_after = batch_totals()
    assert steps_after - steps == 137, (steps, steps_after)
    assert batches_after - batches < 137, (batches, batches_after)

    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["spend"] == 0.37
    assert got["reserved"] == 0.0
    assert got["remaining"] == 0.0

    entries = await ledger_of(gw, key["id"])
    assert len(entries) == 100
    outcomes = Counter((e["outcome"], e["cost"]) for e in entries)
    assert outcomes == {("ok", 0.01): 37, ("rejected", 0.0): 63}
    assert len({e["request_id"] for e in entries}) == 100

    (period,) = await periods_of(gw.state.engine, (await budget_ids(gw, key["id"]))[0])
    assert period.spend == 37 * CENT and period.reserved == 0
    assert await fetch(gw.state.engine, select(R)) == []
    await assert_reconciles(gw.state.engine)

    # Exactly full: the next request is refused too.
    assert (await gw.chat(key["key"], max_tokens=10)).status_code == 429


# -- 2. two budgets on one key: all or nothing ------------------------------------------------


@pytest.mark.parametrize("tight", ["window", "primary"])
async def test_two_budgets_admit_all_or_nothing(gw: Gateway, tight: str) -> None:
    if tight == "window":
        key = await gw.create_key(
            max_budget=1.0, budgets=[{"max_budget": 0.25, "budget_duration": "1d"}]
        )
    else:
        key = await gw.create_key(
            max_budget=0.25, budgets=[{"max_budget": 1.0, "budget_duration": "1d"}]
        )
    responses = await gather_all([gw.chat(key["key"], max_tokens=10) for _ in range(100)])
    assert_statuses(responses, ok=25, rejected=75)

    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    (window,) = got["budgets"]
    # No reservation left behind on the budget that had room when the other one refused.
    assert (got["spend"], got["reserved"]) == (0.25, 0.0)
    assert (window["spend"], window["reserved"]) == (0.25, 0.0)

    ids = await budget_ids(gw, key["id"])
    assert len(ids) == 2
    for budget_id in ids:
        (period,) = await periods_of(gw.state.engine, budget_id)
        assert (period.spend, period.reserved) == (25 * CENT, 0)

    entries = await ledger_of(gw, key["id"])
    assert Counter((e["outcome"], e["cost"]) for e in entries) == {
        ("ok", 0.01): 25,
        ("rejected", 0.0): 75,
    }
    # Each admitted request is charged once to each budget; rejected ones to none.
    charges = await fetch(gw.state.engine, select(C.c.request_id, C.c.amount))
    per_request = Counter(c.request_id for c in charges)
    assert len(per_request) == 25 and set(per_request.values()) == {2}
    assert {c.amount for c in charges} == {CENT}
    await assert_reconciles(gw.state.engine)


# -- 3. reset race across replicas (PostgreSQL) -----------------------------------------------


async def _check_periods_after_rounds(
    engine: AsyncEngine, budget_id: str, nows: list[Any], per_period: int
) -> None:
    """One period per round (plus the first), contiguous on the 30 s grid, each closed once
    as `expired` at the roll, exactly one open; every charge inside its period."""
    periods = await periods_of(engine, budget_id)
    assert len(periods) == len(nows) + 1, [(p.id, p.period_start, p.closed_at) for p in periods]
    open_ = [p for p in periods if p.closed_at is None]
    assert len(open_) == 1 and open_[0].id == periods[-1].id
    for p, closed_at in zip(periods[:-1], nows, strict=True):
        assert p.close_reason == "expired"
        assert p.closed_at == closed_at
    for p in periods:
        assert p.period_end - p.period_start == PERIOD
        assert (p.period_start - START) % PERIOD == timedelta(0)
        assert p.reserved == 0
    for p, now in zip(periods[1:], nows, strict=True):
        assert p.period_start <= now < p.period_end
        assert p.spend == per_period

    charges = await fetch(
        engine,
        select(C.c.request_id, C.c.period_id, L.c.started_at, P.c.period_start, P.c.period_end)
        .join(L, L.c.request_id == C.c.request_id)
        .join(P, P.c.id == C.c.period_id)
        .where(P.c.budget_id == budget_id),
    )
    # Never charged to two periods of one budget, always to the period it was admitted in.
    assert max(Counter(c.request_id for c in charges).values()) == 1
    for c in charges:
        assert c.period_start <= c.started_at < c.period_end, c

    total_spend = sum(p.spend for p in periods)
    ledger_cost = sum(r.cost for r in await fetch(engine, select(L.c.cost)))
    assert total_spend == ledger_cost


async def test_reset_race_across_replicas_opens_exactly_one_period(
    postgres_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(postgres_url, mock_upstream.url, db_pool_size=10)
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(running_gateway(settings, clock)) for _ in range(2)
        ]
        extra_engines = [create_engine(settings) for _ in range(2)]
        for e in extra_engines:
            stack.push_async_callback(e.dispose)
        repos = [g.state.budgets for g in replicas] + [
            BudgetRepository(e, clock, settings.reservation_ttl_seconds) for e in extra_engines
        ]
        engine = replicas[0].state.engine

        key = await replicas[0].create_key(max_budget=0.30, budget_duration="30s")
        (budget_id,) = await budget_ids(replicas[0], key["id"])
        first = await gather_all([replicas[1].chat(key["key"]) for _ in range(40)])
        assert_statuses(first, ok=30, rejected=10)

        rng = random.Random(1234)
        nows = []
        for advance in (30, 75, 30):
            clock.advance(advance)
            nows.append(clock.now())
            jobs = [run_maintenance(repos[i % len(repos)]) for i in range(20)] + [
                replicas[i % 2].chat(key["key"]) for i in range(50)
            ]
            rng.shuffle(jobs)
            results = await gather_all(jobs)
            responses = [r for r in results if not isinstance(r, tuple)]
            # The new period starts at 0: exactly 30 fit, whichever replica admitted them.
            assert_statuses(responses, ok=30, rejected=20)
            open_periods = await fetch(
                engine, select(P.c.id).where(P.c.budget_id == budget_id, P.c.closed_at.is_(None))
            )
            assert len(open_periods) == 1

        await _check_periods_after_rounds(engine, budget_id, nows, per_period=30 * CENT)
        await assert_reconciles(engine)


# -- 4. a request in flight across the boundary -----------------------------------------------


async def test_request_admitted_in_one_period_is_charged_to_it(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=1.0, budget_duration="30s")
    budgets: BudgetRepository = gateway.state.budgets
    flight = await admit(gateway, key["key"], CENT, request_id="req_inflight")
    assert flight.admitted and flight.info.started_at == START
    (held,) = flight.periods
    first_period = held.period_id

    gateway.clock.advance(PERIOD)
    rolled, swept = await run_maintenance(budgets)
    assert (rolled, swept) == (1, 0)
    # A new request now goes to the new period...
    assert (await gateway.chat(key["key"], max_tokens=5)).status_code == 200

    # ... and the one in flight settles into the period it was admitted in.
    states = await settle(gateway, flight.info, Outcome("ok", CENT, "prices", 0, 10, 200))
    assert states is not None and [s.period_id for s in states] == [first_period]

    old, new = await periods_of(gateway.state.engine, held.budget_id)
    assert old.id == first_period and old.close_reason == "expired"
    assert (old.spend, old.reserved) == (CENT, 0)
    assert new.closed_at is None
    assert (new.spend, new.reserved) == (CENT // 2, 0)
    charges = await fetch(
        gateway.state.engine, select(C.c.period_id).where(C.c.request_id == "req_inflight")
    )
    assert [c.period_id for c in charges] == [first_period]
    got = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert (got["spend"], got["reserved"]) == (0.005, 0.0)
    await assert_reconciles(gateway.state.engine)


async def test_request_admitted_before_a_reset_race_is_charged_to_its_period(
    gateway: Gateway,
) -> None:
    """Same, with the roll done by racing requests and schedulers while many are in flight."""
    key = await gateway.create_key(max_budget=1.0, budget_duration="30s")
    budgets: BudgetRepository = gateway.state.budgets
    flights: list[Flight] = await gather_all(
        [admit(gateway, key["key"], CENT, request_id=f"req_flight_{i}") for i in range(10)]
    )
    assert all(f.admitted for f in flights)
    ((first_period, budget_id),) = {(p.period_id, p.budget_id) for f in flights for p in f.periods}

    gateway.clock.advance(PERIOD)
    outcome = Outcome("ok", CENT, "prices", 0, 10, 200)
    await gather_all(
        [run_maintenance(budgets) for _ in range(5)]
        + [gateway.chat(key["key"], max_tokens=5) for _ in range(10)]
        + [settle(gateway, f.info, outcome) for f in flights]
    )
    old, new = await periods_of(gateway.state.engine, budget_id)
    assert old.id == first_period and old.closed_at is not None
    assert (old.spend, old.reserved) == (10 * CENT, 0)
    assert (new.spend, new.reserved, new.closed_at) == (10 * CENT // 2, 0, None)
    await assert_reconciles(gateway.state.engine)


# -- 5. many rolls + requests in one process, SQLite and PostgreSQL ---------------------------


async def test_concurrent_rolls_and_requests_leave_one_open_period(gateway: Gateway) -> None:
    settings = gateway.settings
    key = await gateway.create_key(
        max_budget=0.20,
        budget_duration="30s",
        budgets=[{"max_budget": 1.0, "budget_duration": "1m"}],
    )
    ids = await budget_ids(gateway, key["id"])
    # A second engine on the same database (the CLI, or another process).
    other = create_engine(settings)
    try:
        repos = [gateway.state.budgets, BudgetRepository(other, gateway.clock, 900)]
        nows = []
        for _ in range(3):
            gateway.clock.advance(PERIOD)
            nows.append(gateway.clock.now())
            jobs = [run_maintenance(repos[i % 2]) for i in range(20)] + [
                gateway.chat(key["key"]) for _ in range(30)
            ]
            random.Random(len(nows)).shuffle(jobs)
            results = await gather_all(jobs)
            assert_statuses([r for r in results if not isinstance(r, tuple)], 20, 10)
            for budget_id in ids:
                opened = await fetch(
                    gateway.state.engine,
                    select(P.c.id).where(P.c.budget_id == budget_id, P.c.closed_at.is_(None)),
                )
                assert len(opened) == 1, budget_id
        await _check_periods_after_rounds(gateway.state.engine, ids[0], nows, 20 * CENT)
        # The 1-minute window rolled only at the whole minutes (12:01, and not at 12:00:30).
        window = await periods_of(gateway.state.engine, ids[1])
        assert [(p.period_start.minute, p.closed_at is None) for p in window] == [
            (0, False),
            (1, True),
        ]
        assert [p.spend for p in window] == [20 * CENT, 40 * CENT]
        await assert_reconciles(gateway.state.engine)
    finally:
        await other.dispose()


# -- 6. lock order regressions (PostgreSQL row locks) -----------------------------------------


async def _lock_waiters(engine: AsyncEngine) -> int:
    """Backends of this database waiting for a lock (PostgreSQL)."""
    ((n,),) = await fetch(
        engine,
        text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ),
    )
    return int(n)


async def test_refusal_does_not_deadlock_with_a_budget_lock_holder(
    postgres_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    """The hot path's admission (one statement on PostgreSQL) locks the primary's period row,
    then waits for the window's (busy elsewhere), which refuses. Meanwhile a roll-like
    transaction holds the primary's budget row lock and then wants the primary's period row.
    The admission must never wait for that budget lock while it holds the period row: the
    removed SQLAlchemy reserve did (its undo, a second UPDATE of the row in one transaction,
    re-checked the period's foreign key with FOR KEY SHARE on the budget row), a deadlock: a
    503 for the request, a leaked reservation when the victim was a settlement. And the refusal
    is all or nothing: nothing stays held on the primary."""
    settings = make_settings(postgres_url, mock_upstream.url, db_pool_size=5)
    async with running_gateway(settings, clock) as g:
        key = await g.create_key(
            max_budget=1.0, budgets=[{"max_budget": 0.01, "budget_duration": "1d"}]
        )
        assert (await g.chat(key["key"])).status_code == 200  # the window is now full
        primary_id, window_id = await budget_ids(g, key["id"])
        ctx = await g.state.key_service.authenticate(key["key"])
        primary_period = next(r.period_id for r in ctx.budgets if r.budget_id == primary_id)
        window_period = next(r.period_id for r in ctx.budgets if r.budget_id == window_id)
        assert primary_period < window_period
        budgets: BudgetRepository = g.state.budgets
        engine = g.state.engine

        async with engine.connect() as blocker, engine.connect() as holder:
            # The window's period row is busy (a settlement, say): the admission locks the
            # primary's period row first (ascending id order), then waits here.
            await blocker.begin()
            await blocker.execute(select(P.c.id).where(P.c.id == window_period).with_for_update())
            await holder.begin()
            await budgets.lock_budget(holder, primary_id)  # as _roll / PATCH / reset do
            refusal = asyncio.ensure_future(admit(g, key["key"], CENT, request_id="req_undo"))
            for _ in range(200):  # the admission holds the primary's row, waits for the window
                if await _lock_waiters(engine) >= 1:
                    break
                await asyncio.sleep(0.01)
            # Now the holder wants the period row, as a roll (or an admission after it) does.
            touch = asyncio.ensure_future(
                holder.execute(
                    P.update().where(P.c.id == primary_period).values(reserved=P.c.reserved)
                )
            )
            for _ in range(200):  # both wait: the admission on the blocker, the holder on it
                if await _lock_waiters(engine) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert await _lock_waiters(engine) == 2
            assert not touch.done() and not refusal.done()
            await blocker.rollback()
            flight = await asyncio.wait_for(refusal, timeout=10)
            await asyncio.wait_for(touch, timeout=10)
            await holder.rollback()
        assert not flight.admitted
        assert flight.periods[0].budget_id == window_id
        (p,) = await periods_of(engine, primary_id)
        assert (p.spend, p.reserved) == (CENT, 0)
        assert await fetch(engine, select(R)) == []
        entries = [e for e in await ledger_of(g, key["id"]) if e["request_id"] == "req_undo"]
        assert [(e["outcome"], e["cost"]) for e in entries] == [("rejected", 0.0)]
        await assert_reconciles(engine)


async def test_admission_lock_order_does_not_depend_on_budget_order(gateway: Gateway) -> None:
    """Two budgets expiring at once; 40 admissions race on the hot ledger, each rolling the
    expired periods it is told about and trying again, half of them handing the roll the
    budgets in the opposite order. The admission locks periods in ascending id order and the
    rolls lock budgets in one global order, whatever order they are asked in: no deadlock, and
    every request holds the new period of both budgets (all or nothing)."""
    for round_ in range(3):
        key = await gateway.create_key(
            max_budget=1.0,
            budget_duration="30s",
            budgets=[{"max_budget": 1.0, "budget_duration": "30s"}],
        )
        ctx = await gateway.state.key_service.authenticate(key["key"])
        assert len(ctx.budgets) == 2
        gateway.clock.advance(PERIOD)
        flights: list[Flight] = await gather_all(
            [
                admit(
                    gateway,
                    key["key"],
                    CENT,
                    request_id=f"req_o{round_}_{i}",
                    reverse_rolls=i % 2 == 1,
                )
                for i in range(40)
            ]
        )
        assert all(f.admitted for f in flights)
        new_periods = {p.period_id for f in flights for p in f.periods}
        assert len(new_periods) == 2
        assert new_periods.isdisjoint(r.period_id for r in ctx.budgets)
        outcome = Outcome("ok", CENT, "prices", 0, 10, 200)
        await gather_all([settle(gateway, f.info, outcome) for f in flights])
        for ref in ctx.budgets:
            old, new = await periods_of(gateway.state.engine, ref.budget_id)
            assert (old.spend, old.closed_at is not None) == (0, True)
            assert (new.spend, new.reserved, new.closed_at) == (40 * CENT, 0, None)
    await assert_reconciles(gateway.state.engine)


@pytest.mark.parametrize("window_duration", ["30s", "1h"])
async def test_manual_resets_race_with_rolls_and_requests(
    gateway: Gateway, window_duration: str
) -> None:
    """Manual resets, scheduler rolls and requests on a key whose budgets just expired
    (both, or only the primary): no deadlock, no 503, exactly one open period per budget, the
    ledger reconciles. At most 4 resets of one key at once: each closes the period a racing
    admission may just have found, and admission retries a bounded 5 times (then a transient
    503, by design)."""
    budgets: BudgetRepository = gateway.state.budgets
    for round_ in range(3):
        # A fresh key each round: which of its two budgets sorts first (random ids) varies.
        key = await gateway.create_key(
            max_budget=1.0,
            budget_duration="30s",
            budgets=[{"max_budget": 1.0, "budget_duration": window_duration}],
        )
        ids = await budget_ids(gateway, key["id"])
        gateway.clock.advance(PERIOD)
        jobs = (
            [gateway.admin("POST", f"/admin/keys/{key['id']}/reset") for _ in range(4)]
            + [run_maintenance(budgets) for _ in range(8)]
            + [gateway.chat(key["key"], max_tokens=1) for _ in range(40)]
        )
        random.Random(round_).shuffle(jobs)
        results = await gather_all(jobs)
        statuses = Counter(r.status_code for r in results if not isinstance(r, tuple))
        assert statuses == {200: 44}, statuses
        total = 0
        for budget_id in ids:
            periods = await periods_of(gateway.state.engine, budget_id)
            assert len([p for p in periods if p.closed_at is None]) == 1
            assert all(p.reserved == 0 for p in periods)
            total += sum(p.spend for p in periods)
        assert total == 2 * 40 * CENT // 10  # both budgets charged for every request
    await assert_reconciles(gateway.state.engine)

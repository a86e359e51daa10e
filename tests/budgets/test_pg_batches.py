"""PostgreSQL group commit (app/ledger/contract.py, PostgresHotLedger): the steps that arrive
while a batch runs share the next batch, whatever their keys (a statement and a transaction per
kind of step), each key's decided exactly as if they had come one at a time; one step's error
fails only that step; a lost connection fails its batch and nothing after it; several processes
racing on one key still admit exactly what fits."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from app.ledger import postgres as hotpath
from app.ledger.contract import Admitted, KeyRefused, Outcome, PeriodsExpired
from app.ledger.postgres import PostgresHotLedger
from app.ledger.repository import reconcile
from tests.budgets.helpers import Flight, admit, admit_request, settle
from tests.conftest import Gateway, make_settings, running_gateway
from tests.servers import ServerThread

CENT = 10_000_000  # $0.01 in nano-dollars


def dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


@pytest.fixture
async def gw(postgres_url: str, mock_upstream: ServerThread, clock: Any) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(postgres_url, mock_upstream.url), clock) as g:
        yield g


def record_batches(gw: Gateway) -> list[list[str]]:
    """The kinds of the steps of every batch the gateway's ledger runs from now on."""
    ledger = gw.state.gateway.hot
    assert isinstance(ledger, PostgresHotLedger)
    batches: list[list[str]] = []
    ledger.observe_batches(batches.append)
    return batches


async def until_queued(gw: Gateway, steps: int) -> None:
    """Until `steps` steps wait for the ledger's next batch."""
    for _ in range(1000):
        if gw.state.gateway.hot.queued_steps >= steps:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{gw.state.gateway.hot.queued_steps} steps queued, not {steps}")


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A session of the test's own on the ledger database."""
    conn = await asyncpg.connect(dsn(url))
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def periods_locked(url: str) -> AsyncIterator[asyncpg.Connection]:
    """Another session holds every period row: the ledger's next step waits for it."""
    async with connected(url) as conn:
        async with conn.transaction():
            await conn.execute("SELECT id FROM budget_periods FOR UPDATE")
            yield conn


async def until_waiting(url: str) -> list[int]:
    """The pids of the sessions waiting for a lock, once there is one. (Its own connection:
    the lock holder's transaction would see one snapshot of pg_stat_activity throughout.)"""
    async with connected(url) as conn:
        for _ in range(500):
            pids = [
                r["pid"]
                for r in await conn.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
            ]
            if pids:
                return pids
            await asyncio.sleep(0.01)
    raise AssertionError("no ledger step ever waited for the lock")


async def test_steps_arriving_during_a_batch_share_the_next_transaction(
    gw: Gateway, postgres_url: str
) -> None:
    key = await gw.create_key(alias="b", max_budget=1)
    batches = record_batches(gw)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_waiting(postgres_url)
        rest = [asyncio.ensure_future(admit(gw, key["key"], CENT)) for _ in range(5)]
        await until_queued(gw, 5)
        assert not first.done() and not any(f.done() for f in rest)
    flights = await asyncio.gather(first, *rest)
    assert all(f.admitted for f in flights)
    assert batches == [["admit"], ["admit"] * 5]
    async with connected(postgres_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 6
        assert await conn.fetchval("SELECT sum(reserved) FROM budget_periods") == 6 * CENT


async def test_a_failing_step_fails_alone_and_its_batch_mates_commit(
    gw: Gateway, postgres_url: str
) -> None:
    key = await gw.create_key(alias="b", max_budget=1)
    batches = record_batches(gw)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT, request_id="req_first"))
        await until_waiting(postgres_url)
        a = asyncio.ensure_future(admit(gw, key["key"], CENT, request_id="req_a"))
        # The same request id again: its reservation collides with the first's.
        dup = asyncio.ensure_future(admit(gw, key["key"], CENT, request_id="req_first"))
        c = asyncio.ensure_future(admit(gw, key["key"], CENT, request_id="req_c"))
        await until_queued(gw, 3)
    results = await asyncio.gather(first, a, dup, c, return_exceptions=True)
    assert batches == [["admit"], ["admit"] * 3]
    assert isinstance(results[2], asyncpg.UniqueViolationError), results[2]
    for flight in (results[0], results[1], results[3]):
        assert isinstance(flight, Flight) and flight.admitted, flight
    async with connected(postgres_url) as conn:
        held = await conn.fetch("SELECT request_id FROM reservations ORDER BY request_id")
        assert [r["request_id"] for r in held] == ["req_a", "req_c", "req_first"]
        assert await conn.fetchval("SELECT sum(reserved) FROM budget_periods") == 3 * CENT
    assert (await reconcile(gw.state.engine)).ok


async def test_settles_and_admits_queued_together_run_in_one_batch(
    gw: Gateway, postgres_url: str
) -> None:
    key = await gw.create_key(alias="b", max_budget=1)
    flights = [await admit(gw, key["key"], 5 * CENT) for _ in range(3)]
    batches = record_batches(gw)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_waiting(postgres_url)
        settles = [
            asyncio.ensure_future(settle(gw, f.info, Outcome("ok", 2 * CENT, "usage", 1, 1, 200)))
            for f in flights
        ]
        admits = [asyncio.ensure_future(admit(gw, key["key"], CENT)) for _ in range(3)]
        await until_queued(gw, 6)
    await first
    states = await asyncio.gather(*settles)
    assert all(s is not None and s[0].spend >= 2 * CENT for s in states), states
    assert all(f.admitted for f in await asyncio.gather(*admits))
    assert batches == [["admit"], ["settle"] * 3 + ["admit"] * 3]
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["spend"] == 0.06  # three settled at $0.02
    assert got["reserved"] == 0.04  # four admitted at $0.01, unsettled
    assert (await reconcile(gw.state.engine)).ok


async def test_a_lost_connection_fails_its_batch_only(gw: Gateway, postgres_url: str) -> None:
    key = await gw.create_key(alias="b", max_budget=1)
    batches = record_batches(gw)
    async with periods_locked(postgres_url) as other:
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        (pid,) = await until_waiting(postgres_url)
        queued = [asyncio.ensure_future(admit(gw, key["key"], CENT)) for _ in range(3)]
        await until_queued(gw, 3)
        assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(first, 10)
        await until_waiting(postgres_url)  # the next batch, on another connection
    # The next batch ran on another connection, once the rows were free.
    flights = await asyncio.wait_for(asyncio.gather(*queued), 10)
    assert all(f.admitted for f in flights)
    assert batches == [["admit"], ["admit"] * 3]
    assert (await admit(gw, key["key"], CENT)).admitted
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["reserved"] == 0.04  # the lost step reserved nothing
    assert (await reconcile(gw.state.engine)).ok


async def test_two_processes_race_on_shared_keys_and_admit_exactly_what_fits(
    postgres_url: str, mock_upstream: ServerThread, clock: Any
) -> None:
    """Two gateways (each its own ledger, pool and batches) on one database, four keys with room
    for 15 requests each, 40 requests per key sent to both at once: batches of one process
    race the other's on the same period rows."""
    settings = make_settings(postgres_url, mock_upstream.url, db_pool_size=10)
    async with running_gateway(settings, clock) as one, running_gateway(settings, clock) as two:
        keys = [await one.create_key(alias=f"k{i}", max_budget=0.15) for i in range(4)]
        steps_one, steps_two = record_batches(one), record_batches(two)
        calls = [
            (one if n % 2 else two).chat(key["key"], max_tokens=10)
            for n in range(40)
            for key in keys
        ]
        responses = await asyncio.gather(*calls)
        by_key: Counter[tuple[str, int]] = Counter()
        for n, r in enumerate(responses):
            by_key[(keys[n % 4]["id"], r.status_code)] += 1
        for key in keys:
            assert by_key[(key["id"], 200)] == 15, by_key
            assert by_key[(key["id"], 429)] == 25, by_key
            got = (await one.admin("GET", f"/admin/keys/{key['id']}")).json()
            assert got["spend"] == 0.15 and got["reserved"] == 0.0, got
        # Both processes grouped steps: their batches raced each other on the rows.
        for recorded in (steps_one, steps_two):
            assert max(len(b) for b in recorded) > 1, recorded
        assert (await reconcile(one.state.engine)).ok


def count_admit_statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many statements each admit run of the ledger sends (one per _columns call)."""
    calls: list[int] = []
    real = hotpath._columns

    def counting(steps: list[Any]) -> list[list[Any]]:
        if steps[0].query is hotpath._ADMIT:
            calls.append(len(steps))
        return real(steps)

    monkeypatch.setattr(hotpath, "_columns", counting)
    return calls


async def test_a_batch_that_does_not_all_fit_is_decided_one_step_at_a_time_in_order(
    gw: Gateway, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some of the batch fit, some do not: the steps run again one by one, each decided on what
    the ones before it left, exactly as if they had come one at a time."""
    key = await gw.create_key(alias="b", max_budget=0.06)
    batches = record_batches(gw)
    statements = count_admit_statements(monkeypatch)
    cents = [2, 2, 2, 1, 3, 1]
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_waiting(postgres_url)
        rest = [asyncio.ensure_future(admit(gw, key["key"], c * CENT)) for c in cents]
        await until_queued(gw, len(cents))
    assert (await first).admitted
    # held 1: +2 = 3, +2 = 5, +2 > 6 no, +1 = 6, then the budget is reached: no, no
    admitted = [f.admitted for f in await asyncio.gather(*rest)]
    assert admitted == [True, True, False, True, False, False]
    assert batches == [["admit"], ["admit"] * 6]
    assert statements == [1, 6, 1, 1, 1, 1, 1, 1]  # the batch undecided, then one by one
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["reserved"] == 0.06
    async with connected(postgres_url) as conn:
        assert await conn.fetchval("SELECT count(*) FROM reservations") == 4
        rejected = "SELECT count(*) FROM ledger_entries WHERE outcome = 'rejected'"
        assert await conn.fetchval(rejected) == 3
    assert (await reconcile(gw.state.engine)).ok


async def test_a_batch_none_of_which_fits_is_rejected_in_one_statement(
    gw: Gateway, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await gw.create_key(alias="b", max_budget=0.03)
    assert (await admit(gw, key["key"], 2 * CENT)).admitted
    statements = count_admit_statements(monkeypatch)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_waiting(postgres_url)
        rest = [asyncio.ensure_future(admit(gw, key["key"], 2 * CENT)) for _ in range(4)]
        await until_queued(gw, 4)
    assert (await first).admitted  # the budget is reached with it
    flights = await asyncio.gather(*rest)
    assert not any(f.admitted for f in flights)
    assert all(f.periods[0].remaining == 0 for f in flights)
    assert statements == [1, 4]
    async with connected(postgres_url) as conn:
        rejected = "SELECT count(*) FROM ledger_entries WHERE outcome = 'rejected'"
        assert await conn.fetchval(rejected) == 4
        assert await conn.fetchval("SELECT sum(reserved) FROM budget_periods") == 3 * CENT
    assert (await reconcile(gw.state.engine)).ok


async def test_a_batch_of_several_keys_decides_each_key_on_its_own(
    gw: Gateway, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One batch, three keys interleaved: the key whose steps all fit (to the last cent) is
    reserved and the key none of whose steps fits is rejected in the batch's statement; only the
    key whose budget ends inside the batch runs again, one step at a time. Each on its own
    periods: the other keys' steps count for nothing in a key's verdict."""
    fills = await gw.create_key(alias="fills", max_budget=0.05)
    spent = await gw.create_key(alias="spent", max_budget=0.03)
    tight = await gw.create_key(alias="tight", max_budget=0.05)
    assert (await admit(gw, spent["key"], 2 * CENT)).admitted
    batches = record_batches(gw)
    statements = count_admit_statements(monkeypatch)
    order = [fills, spent, tight, fills, spent, tight, tight]
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, fills["key"], CENT))
        await until_waiting(postgres_url)
        hot = gw.state.gateway.hot
        rest = [
            asyncio.ensure_future(hot.admit(admit_request(gw, k["key"], 2 * CENT), gw.clock.now()))
            for k in order
        ]
        await until_queued(gw, len(order))
    assert (await first).admitted
    results = await asyncio.gather(*rest)
    assert [r.key.alias for r in results] == [k["alias"] for k in order]  # type: ignore[union-attr]
    admitted = [isinstance(r, Admitted) for r in results]
    # fills (1 of 5 cents held): 3, 5; spent (2 of 3 held): no, no; tight (5): 2, 4, then no
    assert admitted == [True, False, True, True, False, True, False]
    assert batches == [["admit"], ["admit"] * 7]
    assert statements == [1, 7, 1, 1, 1]  # tight's three steps again, one by one
    expected = {fills["id"]: (0.05, 3), spent["id"]: (0.02, 1), tight["id"]: (0.04, 2)}
    async with connected(postgres_url) as conn:
        for key_id, (reserved, open_reservations) in expected.items():
            got = (await gw.admin("GET", f"/admin/keys/{key_id}")).json()
            assert got["reserved"] == reserved, got
            held = "SELECT count(*) FROM reservations WHERE key_id = $1"
            assert await conn.fetchval(held, key_id) == open_reservations
        rejected = "SELECT key_id, count(*) FROM ledger_entries WHERE outcome = 'rejected' "
        counts = dict(await conn.fetch(rejected + "GROUP BY key_id"))
        assert counts == {spent["id"]: 2, tight["id"]: 1}
    assert (await reconcile(gw.state.engine)).ok


async def test_a_key_whose_period_ended_does_not_hold_up_its_batch_mates(
    gw: Gateway, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one batch, the key whose period has ended is told so (its caller rolls the period and
    tries again), and nothing is written for it; the other key's step is reserved by the same
    statement."""
    ended = await gw.create_key(alias="ended", max_budget=1, budget_duration="1h")
    other = await gw.create_key(alias="other", max_budget=1)
    gw.clock.advance(timedelta(hours=2))
    hot = gw.state.gateway.hot
    statements = count_admit_statements(monkeypatch)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, other["key"], CENT))
        await until_waiting(postgres_url)
        stale = asyncio.ensure_future(
            hot.admit(admit_request(gw, ended["key"], CENT), gw.clock.now())
        )
        fresh = asyncio.ensure_future(
            hot.admit(admit_request(gw, other["key"], CENT), gw.clock.now())
        )
        await until_queued(gw, 2)
    assert (await first).admitted
    result = await stale
    assert isinstance(result, PeriodsExpired) and len(result.expired) == 1
    fresh_result = await fresh
    assert isinstance(fresh_result, Admitted)
    assert statements == [1, 2]  # decided in the batch's statement, not run again
    async with connected(postgres_url) as conn:
        held = "SELECT key_id, sum(amount) FROM reservations GROUP BY key_id"
        assert dict(await conn.fetch(held)) == {other["id"]: 2 * CENT}
    assert (await reconcile(gw.state.engine)).ok


async def test_an_unknown_key_in_a_batch_is_unauthenticated_and_its_mates_admitted(
    gw: Gateway, postgres_url: str
) -> None:
    key = await gw.create_key(alias="b", max_budget=1)
    hot = gw.state.gateway.hot
    batches = record_batches(gw)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_waiting(postgres_url)
        unknown = asyncio.ensure_future(
            hot.admit(admit_request(gw, "sk-bg-" + "0" * 40, CENT), gw.clock.now())
        )
        known = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_queued(gw, 2)
    assert (await first).admitted
    result = await unknown
    assert result == KeyRefused(None, "unknown")
    assert (await known).admitted
    assert batches == [["admit"], ["admit"] * 2]
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["reserved"] == 0.02
    assert (await reconcile(gw.state.engine)).ok


async def test_a_batch_admits_each_step_for_its_own_model(gw: Gateway, postgres_url: str) -> None:
    key = await gw.create_key(alias="b", max_budget=1, models=["bg-test"])
    hot = gw.state.gateway.hot
    batches = record_batches(gw)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(admit(gw, key["key"], CENT))
        await until_waiting(postgres_url)
        allowed = [asyncio.ensure_future(admit(gw, key["key"], CENT)) for _ in range(2)]
        other = admit_request(gw, key["key"], CENT, model="gpt-other")
        refused = asyncio.ensure_future(hot.admit(other, gw.clock.now()))
        await until_queued(gw, 3)
    assert (await first).admitted
    assert all(f.admitted for f in await asyncio.gather(*allowed))
    result = await refused
    assert isinstance(result, KeyRefused) and result.reason == "model"
    assert batches == [["admit"], ["admit"] * 3]  # the refused step was one of the batch
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["reserved"] == 0.03
    assert (await reconcile(gw.state.engine)).ok


async def test_a_settle_batch_leaves_out_a_request_settled_already(
    gw: Gateway, postgres_url: str
) -> None:
    key = await gw.create_key(alias="b", max_budget=1)
    one, two, three = [await admit(gw, key["key"], 5 * CENT) for _ in range(3)]
    done = Outcome("ok", 2 * CENT, "usage", 1, 1, 200)
    assert await settle(gw, two.info, done) is not None
    batches = record_batches(gw)
    async with periods_locked(postgres_url):
        first = asyncio.ensure_future(settle(gw, one.info, done))
        await until_waiting(postgres_url)
        again = asyncio.ensure_future(settle(gw, two.info, done))
        last = asyncio.ensure_future(settle(gw, three.info, done))
        await until_queued(gw, 2)
    assert await first is not None
    assert await again is None
    states = await last
    assert states is not None and states[0].spend == 6 * CENT and states[0].reserved == 0
    assert batches == [["settle"], ["settle"] * 2]
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["spend"] == 0.06 and got["reserved"] == 0.0
    assert (await reconcile(gw.state.engine)).ok

"""Shrink to fit in the ledger's admission (SPEC 10): a request that carries a `min_amount` and
does not fit in full holds the largest amount that fits every one of its budgets, if that is at
least `min_amount`, in the same atomic step as any admission; the admission says what it held.
Both ledgers, alone and in group-committed batches; the choice itself property-tested."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from app.budgets.state import PeriodState, amount_to_reserve
from app.ledger.contract import AdmitRequest, Admitted, Outcome, Rejected, RequestInfo
from tests.budgets.helpers import (
    admit,
    admit_request,
    assert_reconciled,
    get_key,
    ledger,
    periods,
    settle,
)
from tests.conftest import Gateway

CENT = 10_000_000  # nano-dollars


async def try_admit(
    gw: Gateway, key: dict, amount: int, min_amount: int | None
) -> Admitted | Rejected:
    """One admission on the hot ledger (the key's periods are current)."""
    return await admit_with(gw, shrinkable(gw, key, amount, min_amount))


def shrinkable(gw: Gateway, key: dict, amount: int, min_amount: int | None) -> AdmitRequest:
    return replace(admit_request(gw, key["key"], amount), min_amount=min_amount)


async def admit_with(gw: Gateway, req: AdmitRequest) -> Admitted | Rejected:
    decision = await gw.state.gateway.hot.admit(req, gw.clock.now())
    assert isinstance(decision, Admitted | Rejected), decision
    return decision


async def spend(gw: Gateway, key: dict, amount: int) -> None:
    flight = await admit(gw, key["key"], amount)
    assert flight.admitted
    await settle(gw, flight.info, Outcome("ok", amount, "prices", 1, 1, 200))


async def test_a_request_too_big_for_the_room_holds_what_fits(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(max_budget=1, budget_duration="1mo")
    await spend(gw, key, 70 * CENT)  # room: $0.30

    for min_amount in (None, 40 * CENT):  # all or nothing; a minimum over the room
        refused = await try_admit(gw, key, 50 * CENT, min_amount)
        assert isinstance(refused, Rejected)
        assert refused.refusing.remaining == 30 * CENT
    req = shrinkable(gw, key, 50 * CENT, 10 * CENT)
    shrunk = await admit_with(gw, req)
    assert isinstance(shrunk, Admitted)
    assert shrunk.amount == 30 * CENT
    [state] = shrunk.periods
    assert (state.spend, state.reserved, state.remaining) == (70 * CENT, 30 * CENT, 0)
    # The budget is reached: nothing more, however small.
    reached = await try_admit(gw, key, 50 * CENT, 0)
    assert isinstance(reached, Rejected)

    # What the ledger holds is the shrunk amount: the settlement's overrun is over it.
    entries = await ledger(gw, key["id"])
    assert [e["outcome"] for e in entries].count("rejected") == 3
    info = RequestInfo(req.request_id, key["id"], req.model, req.endpoint, False, req.started_at)
    await settle(gw, info, Outcome("ok", 35 * CENT, "prices", 1, 1, 200))
    by_id = {e["request_id"]: e for e in await ledger(gw, key["id"])}
    assert (by_id[req.request_id]["cost"], by_id[req.request_id]["overrun"]) == (0.35, 0.05)
    await assert_reconciled(gw)


async def test_a_request_that_fits_in_full_is_not_shrunk(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(max_budget=1, budget_duration="1mo")
    result = await try_admit(gw, key, 40 * CENT, 10 * CENT)
    assert isinstance(result, Admitted) and result.amount == 40 * CENT
    assert (await get_key(gw, key["id"]))["reserved"] == 0.4


async def test_shrinking_holds_what_fits_every_budget(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(
        max_budget=1, budget_duration="1mo", budgets=[{"max_budget": 0.5, "budget_duration": "1d"}]
    )
    await spend(gw, key, 30 * CENT)  # rooms: $0.70 and $0.20
    result = await try_admit(gw, key, 50 * CENT, 5 * CENT)
    assert isinstance(result, Admitted) and result.amount == 20 * CENT
    assert [p["reserved"] for p in await periods(gw, key["id"])] == [0.2, 0.2]
    await assert_reconciled(gw)


async def test_shrinking_requests_batched_together_are_decided_in_turn(gateway: Gateway) -> None:
    """Admitted at once (one group-committed batch, on PostgreSQL one statement), with another
    key's requests: each is decided on what the ones before it left."""
    gw = gateway
    tight = await gw.create_key(max_budget=1, budget_duration="1mo")
    roomy = await gw.create_key(max_budget=10, budget_duration="1mo")
    await spend(gw, tight, 70 * CENT)  # room: $0.30
    asks = [(tight, 20 * CENT, 5 * CENT), (roomy, 20 * CENT, 5 * CENT)] * 3
    results = await asyncio.gather(*(try_admit(gw, k, a, m) for k, a, m in asks))
    held = [r.amount if isinstance(r, Admitted) else None for r in results]
    assert held == [20 * CENT, 20 * CENT, 10 * CENT, 20 * CENT, None, 20 * CENT]
    assert (await get_key(gw, tight["id"]))["reserved"] == 0.3
    assert (await get_key(gw, roomy["id"]))["reserved"] == 0.6
    await assert_reconciled(gw)


# -- the choice, as a pure function -----------------------------------------------------------

START = datetime(2026, 1, 1, tzinfo=UTC)
MONEY = st.integers(0, 10**6)
STATES = st.lists(
    st.tuples(st.none() | MONEY, MONEY, MONEY).map(
        lambda t: PeriodState("b", 1, START, None, t[0], t[1], t[2])
    ),
    max_size=4,
)


@given(STATES, MONEY, st.none() | MONEY)
def test_the_amount_held_fits_every_period_and_is_the_largest_that_does(
    states: list[PeriodState], amount: int, min_amount: int | None
) -> None:
    take = amount_to_reserve(states, amount, min_amount)
    if take is None:
        # nothing from the least allowed amount up to the amount asked fits
        least = amount if min_amount is None else min(min_amount, amount)
        assert not all(st.fits(least) for st in states)
        return
    assert all(st.fits(take) for st in states)
    assert take == amount or (min_amount is not None and min_amount <= take < amount)
    assert take == amount or not all(st.fits(take + 1) for st in states)

"""Reservations that never settle (a crashed replica) are settled by the sweeper after
BUDGETGATE_RESERVATION_TTL_SECONDS, recorded once as `abandoned` and charged their full
reservation (SPEC 5, 6); a request admitted in one period is charged to that period."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from app.ledger.contract import Outcome, RequestInfo
from app.scheduler import run_maintenance
from tests.budgets.helpers import admit, assert_reconciled, get_key, ledger, periods, settle
from tests.conftest import Gateway

TTL = timedelta(seconds=900)  # the default BUDGETGATE_RESERVATION_TTL_SECONDS
CENTS_20 = 200_000_000  # $0.20 in nano-dollars


async def crashed_reservation(gw: Gateway, key: dict, amount: int) -> RequestInfo:
    """Admit on the hot ledger as the request path does, then never settle (the replica
    died)."""
    flight = await admit(gw, key["key"], amount, stream=True)
    assert flight.admitted
    assert flight.info.key_id == key["id"] and flight.info.started_at == gw.clock.now()
    return flight.info


async def test_abandoned_reservation_is_swept_once(gateway: Gateway) -> None:
    gw = gateway
    assert gw.settings.reservation_ttl_seconds == TTL.total_seconds()
    key = await gw.create_key(alias="crashy", max_budget=1.0, budget_duration="1mo")
    req = await crashed_reservation(gw, key, CENTS_20)
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.2 and state["remaining"] == 0.8

    # The held $0.20 counts against the budget: $0.80 more fits exactly, then nothing does.
    r = await gw.chat(key["key"], max_tokens=800)
    assert r.status_code == 200, r.text
    r = await gw.chat(key["key"], max_tokens=1)  # $0.80 spent + $0.20 held = the limit
    assert r.status_code == 429, r.text

    gw.clock.advance(TTL - timedelta(seconds=1))
    assert await run_maintenance(gw.state.budgets) == (0, 0)  # not yet expired
    assert (await get_key(gw, key["id"]))["reserved"] == 0.2

    gw.clock.advance(timedelta(seconds=1))
    assert await run_maintenance(gw.state.budgets) == (0, 1)
    assert await run_maintenance(gw.state.budgets) == (0, 0)  # once only
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.0
    assert state["spend"] == 1.0  # the upstream may have billed it: charged its reservation
    assert state["remaining"] == 0.0

    entries = [e for e in await ledger(gw, key["id"]) if e["request_id"] == req.request_id]
    assert len(entries) == 1
    assert entries[0]["outcome"] == "abandoned"
    assert (entries[0]["cost"], entries[0]["cost_source"]) == (0.2, "reservation")
    assert entries[0]["overrun"] == 0.0
    assert entries[0]["stream"] is True and entries[0]["model"] == "bg-test"

    # The room is spent, not released.
    r = await gw.chat(key["key"], max_tokens=1)
    assert r.status_code == 429, r.text

    # The crashed replica comes back and tries to settle: nothing to settle, nothing written.
    before = await ledger(gw, key["id"])
    late = await settle(
        gw, req, Outcome("ok", CENTS_20, "prices", prompt_tokens=3, completion_tokens=200)
    )
    assert late is None
    assert await ledger(gw, key["id"]) == before
    state = await get_key(gw, key["id"])
    assert state["spend"] == 1.0 and state["reserved"] == 0.0
    await assert_reconciled(gw)


async def test_settled_reservation_is_not_swept(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="slow", max_budget=1.0, budget_duration="1mo")
    req = await crashed_reservation(gw, key, CENTS_20)
    gw.clock.advance(timedelta(seconds=600))  # a long stream, finishing before the TTL
    states = await settle(
        gw, req, Outcome("ok", 150_000_000, "prices", prompt_tokens=3, completion_tokens=150)
    )
    assert states is not None and states[0].spend == 150_000_000 and states[0].reserved == 0
    gw.clock.advance(TTL)
    assert await run_maintenance(gw.state.budgets) == (0, 0)
    entries = await ledger(gw, key["id"])
    assert [(e["outcome"], e["cost"]) for e in entries] == [("ok", 0.15)]
    await assert_reconciled(gw)


async def test_abandoned_reservation_across_a_reset(gateway: Gateway) -> None:
    """A replica dies holding a January reservation; February opens with nothing held, and the
    sweep releases the hold on the (closed) January period."""
    gw = gateway
    key = await gw.create_key(alias="crash-at-eom", max_budget=1.0, budget_duration="1mo")
    gw.clock.set(datetime(2026, 1, 31, 23, 55, tzinfo=UTC))
    await crashed_reservation(gw, key, CENTS_20)

    gw.clock.set(datetime(2026, 2, 1, 0, 30, tzinfo=UTC))  # past the reset and the TTL
    assert await run_maintenance(gw.state.budgets) == (1, 1)
    state = await get_key(gw, key["id"])
    assert state["reserved"] == 0.0 and state["remaining"] == 1.0
    jan, feb = await periods(gw, key["id"])
    assert jan["close_reason"] == "expired" and jan["reserved"] == 0.0 and jan["spend"] == 0.2
    assert feb["closed_at"] is None and feb["reserved"] == 0.0 and feb["spend"] == 0.0
    await assert_reconciled(gw)


async def test_request_admitted_before_a_reset_is_charged_to_its_period(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="late-finish", max_budget=1.0, budget_duration="1mo")
    gw.clock.set(datetime(2026, 1, 31, 23, 59, 30, tzinfo=UTC))
    req = await crashed_reservation(gw, key, CENTS_20)

    gw.clock.set(datetime(2026, 2, 1, 0, 1, tzinfo=UTC))
    assert await run_maintenance(gw.state.budgets) == (1, 0)  # the reservation is still live
    states = await settle(
        gw, req, Outcome("ok", CENTS_20, "prices", prompt_tokens=3, completion_tokens=200)
    )
    assert states is not None

    jan, feb = await periods(gw, key["id"])
    assert jan["spend"] == 0.2 and jan["reserved"] == 0.0 and jan["close_reason"] == "expired"
    assert feb["spend"] == 0.0 and feb["reserved"] == 0.0 and feb["closed_at"] is None
    state = await get_key(gw, key["id"])
    assert state["spend"] == 0.0 and state["remaining"] == 1.0
    await assert_reconciled(gw)


async def test_manual_reset_with_a_request_in_flight(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="inflight", max_budget=1.0, budget_duration="1mo")
    req = await crashed_reservation(gw, key, CENTS_20)
    r = await gw.admin("POST", f"/admin/keys/{key['id']}/reset")
    assert r.status_code == 200, r.text
    assert r.json()["reserved"] == 0.0  # the hold stays with the period that admitted it
    await settle(gw, req, Outcome("ok", CENTS_20, "prices", prompt_tokens=3, completion_tokens=200))
    old, new = await periods(gw, key["id"])
    assert old["close_reason"] == "manual" and old["spend"] == 0.2 and old["reserved"] == 0.0
    assert new["spend"] == 0.0
    await assert_reconciled(gw)


async def test_sweep_racing_settles_records_each_request_once(gateway: Gateway) -> None:
    """The sweeper and late settlements of the same expired requests at once (and others after
    it), on a key with two budgets: each request ends as exactly one entry (abandoned at its
    reservation, or settled at its cost), both periods charged that entry's cost, nothing
    held."""
    gw = gateway
    key = await gw.create_key(
        max_budget=10, budget_duration="1mo", budgets=[{"max_budget": 5, "budget_duration": "1d"}]
    )
    reqs = [await crashed_reservation(gw, key, CENTS_20) for _ in range(8)]
    gw.clock.advance(TTL)
    late = Outcome("ok", 150_000_000, "prices", prompt_tokens=3, completion_tokens=150)
    racing, after = reqs[:4], reqs[4:]
    results = await asyncio.gather(
        gw.state.budgets.sweep_expired_reservations(), *(settle(gw, r, late) for r in racing)
    )
    swept, settled = results[0], [s for s in results[1:] if s is not None]
    assert swept + len(settled) == len(reqs)
    assert [await settle(gw, r, late) for r in after] == [None] * len(after)  # swept already
    entries = await ledger(gw, key["id"])
    assert sorted(e["request_id"] for e in entries) == sorted(r.request_id for r in reqs)
    costs = {("abandoned", 0.2, "reservation"), ("ok", 0.15, "prices")}
    assert {(e["outcome"], e["cost"], e["cost_source"]) for e in entries} <= costs
    total = sum(Decimal(str(e["cost"])) for e in entries)
    for p in await periods(gw, key["id"]):
        assert (Decimal(str(p["spend"])), p["reserved"]) == (total, 0.0)
    await assert_reconciled(gw)

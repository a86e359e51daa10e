"""Overruns (SPEC 10): a request whose real cost exceeds its reservation is charged its real cost
in full, and its ledger entry records the excess as `overrun`, computed by the ledger's settle
from the amount the ledger held (both ledgers, alone and in a group-committed batch)."""

from __future__ import annotations

import asyncio

from app.ledger.contract import Outcome
from tests.budgets.helpers import (
    admit,
    assert_reconciled,
    chat_billed,
    get_key,
    ledger,
    periods,
    settle,
)
from tests.conftest import Gateway

CENT = 10_000_000  # nano-dollars


async def test_a_request_over_its_reservation_is_charged_in_full(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="overrun", max_budget=0.03, budget_duration="1mo")
    r = await chat_billed(gw, key, "0.05")
    assert r.status_code == 200, r.text
    r = await gw.chat(key["key"])  # spend is past the limit now: refused
    assert r.status_code == 429, r.text

    entries = {e["outcome"]: e for e in await ledger(gw, key["id"])}
    ok = entries["ok"]
    assert (ok["cost"], ok["overrun"], ok["cost_source"]) == (0.05, 0.04, "upstream")
    assert entries["rejected"]["overrun"] == 0.0
    state = await get_key(gw, key["id"])
    assert state["spend"] == 0.05 and state["reserved"] == 0.0
    await assert_reconciled(gw)


async def test_a_request_within_its_reservation_has_no_overrun(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(max_budget=1, budget_duration="1mo")
    r = await chat_billed(gw, key, "0.01")  # exactly what it reserved
    assert r.status_code == 200, r.text
    r = await chat_billed(gw, key, "0.004")
    assert r.status_code == 200, r.text
    assert sorted((e["cost"], e["overrun"]) for e in await ledger(gw, key["id"])) == [
        (0.004, 0.0),
        (0.01, 0.0),
    ]


async def test_overrun_is_measured_against_what_the_ledger_held(gateway: Gateway) -> None:
    """Settled together (one group-committed batch), requests with different reservations and
    costs, on a key with two budgets: each entry's overrun is its cost minus its own
    reservation, and every period is charged the full cost."""
    gw = gateway
    key = await gw.create_key(
        max_budget=1, budgets=[{"max_budget": 2, "budget_duration": "1d"}], budget_duration="1mo"
    )
    cases = [(5 * CENT, 7 * CENT), (3 * CENT, 3 * CENT), (4 * CENT, 1 * CENT), (2 * CENT, 9 * CENT)]
    flights = [await admit(gw, key["key"], amount) for amount, _ in cases]
    settled = await asyncio.gather(
        *(
            settle(gw, f.info, Outcome("ok", cost, "upstream", 1, 1, 200))
            for f, (_, cost) in zip(flights, cases, strict=True)
        )
    )
    assert all(s is not None for s in settled)
    by_id = {e["request_id"]: e for e in await ledger(gw, key["id"])}
    got = [(by_id[f.info.request_id]["cost"], by_id[f.info.request_id]["overrun"]) for f in flights]
    assert got == [(0.07, 0.02), (0.03, 0.0), (0.01, 0.0), (0.09, 0.07)]
    total = sum(cost for _, cost in cases) / 1e9
    assert [round(p["spend"], 9) for p in await periods(gw, key["id"])] == [total, total]
    await assert_reconciled(gw)

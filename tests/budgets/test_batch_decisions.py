"""Steps run together in one batch decide exactly as they would one by one (SQLite decides a
batch's admits in Python on the keys it read in one query, app/ledger/contract.py
`_sqlite_admit`; PostgreSQL in one statement over arrays, each key on its own): order is kept,
every budget of a key counts, a refusal reserves nothing, and a batch's settles charge each
request once. On both ledgers."""

from __future__ import annotations

import asyncio
from collections import Counter

from app.ledger.contract import Outcome
from app.ledger.repository import reconcile
from tests.budgets.helpers import admit, settle
from tests.conftest import Gateway

CENT = 10_000_000  # $0.01 in nano-dollars


async def test_a_batch_of_admits_over_two_keys_and_two_budgets_admits_in_order(
    gateway: Gateway,
) -> None:
    # a: its own budget has room for 5 cents, its window for 3: the window decides.
    a = await gateway.create_key(
        alias="a", max_budget=0.05, budgets=[{"max_budget": 0.03, "budget_duration": "1h"}]
    )
    b = await gateway.create_key(alias="b", max_budget=0.04)
    order = ["a", "b"] * 6  # 12 admits, interleaved, queued in one event-loop turn
    plain = {"a": a["key"], "b": b["key"]}
    flights = await asyncio.gather(
        *[admit(gateway, plain[name], CENT) for name in order], return_exceptions=True
    )
    assert not [f for f in flights if isinstance(f, BaseException)], flights
    admitted = [name for name, f in zip(order, flights, strict=True) if f.admitted]
    # The first ones of each key get in, in order; the rest are refused.
    verdicts = [f.admitted for f in flights]
    assert verdicts[0::2] == [True] * 3 + [False] * 3, verdicts
    assert verdicts[1::2] == [True] * 4 + [False] * 2, verdicts
    assert Counter(admitted) == {"a": 3, "b": 4}
    # Each admitted request saw the money left by the ones before it.
    a_reserved = [max(s.reserved for s in f.periods) for f in flights[0:6:2]]
    assert a_reserved == [CENT, 2 * CENT, 3 * CENT], a_reserved
    # A refusal names the budget that refused it: a's window, full at 3 cents.
    refused = flights[6].periods
    assert len(refused) == 1 and refused[0].max_budget == 3 * CENT, refused

    key_a = (await gateway.admin("GET", f"/admin/keys/{a['id']}")).json()
    assert key_a["reserved"] == 0.03
    assert [w["reserved"] for w in key_a["budgets"]] == [0.03]
    assert (await gateway.admin("GET", f"/admin/keys/{b['id']}")).json()["reserved"] == 0.04
    entries = (await gateway.admin("GET", "/admin/ledger", params={"limit": 100})).json()["data"]
    assert Counter(e["outcome"] for e in entries) == {"rejected": 5}
    report = await reconcile(gateway.state.engine)
    assert report.ok, report.problems


async def test_a_batch_of_settles_charges_each_request_once(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="s", max_budget=1)
    flights = [await admit(gateway, key["key"], 5 * CENT) for _ in range(4)]
    cost = Outcome("ok", 2 * CENT, "usage", 10, 10, 200)
    # One request settled twice in the same batch, the others once: all in one turn.
    results = await asyncio.gather(
        *[settle(gateway, f.info, cost) for f in flights],
        settle(gateway, flights[0].info, cost),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    # A duplicate settlement finds nothing to settle (None) -- or, on a ledger that runs it as
    # its own statement after the first, the same; never a second charge.
    assert not errors, errors
    assert [r is None for r in results] == [False, False, False, False, True], results
    got = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["spend"] == 0.08 and got["reserved"] == 0.0, got
    entries = (await gateway.admin("GET", "/admin/ledger", params={"limit": 100})).json()["data"]
    assert sorted(e["request_id"] for e in entries) == sorted(f.info.request_id for f in flights)
    report = await reconcile(gateway.state.engine)
    assert report.ok, report.problems

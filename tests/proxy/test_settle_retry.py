"""A settlement that meets a ledger outage is retried until it lands: the upstream answered
(and may have billed), so the request must still be charged exactly once."""

import asyncio

import pytest

from app.keys.service import dollars
from app.ledger.contract import Outcome
from tests.budgets.helpers import admit
from tests.conftest import Gateway

CENT = 10_000_000  # $0.01 in nano-dollars


async def test_settlement_is_retried_after_a_ledger_error(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=1.0)
    hot = gateway.state.gateway.hot
    real_settle = hot.settle_soon
    failures = []

    def flaky_settle(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(failures) < 2:
            failures.append(1)
            lost = asyncio.get_running_loop().create_future()
            lost.set_exception(OSError("ledger connection lost"))
            return lost
        return real_settle(*args, **kwargs)

    hot.settle_soon = flaky_settle
    try:
        r = await gateway.chat(key["key"], max_tokens=10)
        assert r.status_code == 200, r.text
        # Not settled yet: the reservation still holds the money, so the budget stays closed for it.
        held = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
        assert held["reserved"] == 0.01 and held["spend"] == 0.0
        for _ in range(100):
            got = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
            if got["spend"] == 0.01:
                break
            await asyncio.sleep(0.05)
    finally:
        hot.settle_soon = real_settle
    assert len(failures) == 2
    assert got["spend"] == 0.01 and got["reserved"] == 0.0
    entries = (await gateway.admin("GET", f"/admin/ledger?key_id={key['id']}")).json()["data"]
    assert [(e["outcome"], e["cost"]) for e in entries] == [("ok", dollars(10_000_000))]


async def test_a_settlement_whose_request_is_cancelled_still_lands(gateway: Gateway) -> None:
    """The server cancels a request (shutdown) while its settlement runs: the ledger finishes
    it; and when that settlement then meets a ledger error, it is retried in the background
    all the same."""
    key = await gateway.create_key(max_budget=1.0)
    gw = gateway.state.gateway
    hot = gw.hot
    real_settle = hot.settle_soon
    failures = []

    def failing_once(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if failures:
            return real_settle(*args, **kwargs)
        failures.append(1)
        lost = asyncio.get_running_loop().create_future()
        # Fails after its caller was cancelled: only the background retry can land it.
        asyncio.get_running_loop().call_later(
            0.05, lost.set_exception, OSError("ledger connection lost")
        )
        return lost

    for fail in (False, True):
        flight = await admit(gateway, key["key"], CENT)
        if fail:
            hot.settle_soon = failing_once
        try:
            settling = asyncio.ensure_future(
                gw.settlement.settle(flight.info, Outcome("ok", CENT // 2, "usage", 1, 1, 200))
            )
            await asyncio.sleep(0)  # submitted
            settling.cancel()
            with pytest.raises(asyncio.CancelledError):
                await settling
            for _ in range(100):  # lands (a retry's first try is 0.1 s after the failure)
                entries = await ledger_entries(gateway, key["id"])
                if flight.info.request_id in entries:
                    break
                await asyncio.sleep(0.05)
        finally:
            hot.settle_soon = real_settle
        assert entries.get(flight.info.request_id) == ("ok", dollars(CENT // 2))
    assert failures == [1]
    got = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["spend"] == 0.01 and got["reserved"] == 0.0, got


async def ledger_entries(gateway: Gateway, key_id: str) -> dict[str, tuple[str, float]]:
    r = await gateway.admin("GET", f"/admin/ledger?key_id={key_id}")
    return {e["request_id"]: (e["outcome"], e["cost"]) for e in r.json()["data"]}

"""A settlement that meets a ledger outage is retried until it lands: the upstream answered
(and may have billed), so the request must still be charged exactly once."""

import asyncio

from app.keys.service import dollars
from tests.conftest import Gateway


async def test_settlement_is_retried_after_a_ledger_error(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=1.0)
    hot = gateway.state.gateway.hot
    real_settle = hot.settle
    failures = []

    async def flaky_settle(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(failures) < 2:
            failures.append(1)
            raise OSError("ledger connection lost")
        return await real_settle(*args, **kwargs)

    hot.settle = flaky_settle
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
        hot.settle = real_settle
    assert len(failures) == 2
    assert got["spend"] == 0.01 and got["reserved"] == 0.0
    entries = (await gateway.admin("GET", f"/admin/ledger?key_id={key['id']}")).json()["data"]
    assert [(e["outcome"], e["cost"]) for e in entries] == [("ok", dollars(10_000_000))]

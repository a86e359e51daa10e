"""Shrink to fit (SPEC 10): with BUDGETGATE_SHRINK_TO_FIT on, a request whose output bound does
not fit the budget's room, but a bound of at least BUDGETGATE_MIN_OUTPUT_TOKENS does, is
admitted with the largest bound that fits, forwarded with it, and says so in a header; spend
stays within max_budget. bg-test costs $0.001 an output token and nothing for input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.clock import ManualClock
from tests.conftest import Gateway, make_settings, running_gateway
from tests.keys.helpers import bearer, key_object, ledger, mock_stats
from tests.servers import ServerThread

LIMITED = "x-budget-output-tokens-limited"


@pytest.fixture
async def shrinking(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> AsyncIterator[Gateway]:
    settings = make_settings(database_url, mock_upstream.url, shrink_to_fit=True)
    async with running_gateway(settings, clock) as gw:
        yield gw


async def test_a_request_without_max_tokens_is_shrunk_to_the_room_left(
    shrinking: Gateway, mock_upstream: ServerThread
) -> None:
    key = await shrinking.create_key(max_budget=0.3005, budget_duration="1mo")
    for stream in (False, True):
        if stream:
            # Spent down to room for 300 tokens again by a new key: one key, one check each.
            key = await shrinking.create_key(max_budget=0.3005, budget_duration="1mo")
        r = await shrinking.chat(key["key"], max_tokens=None, stream=stream)
        assert r.status_code == 200, r.text
        assert r.headers[LIMITED] == "300"
        sent = (await mock_stats(mock_upstream.url))["last_body"]
        assert sent["max_tokens"] == 300  # the default (4096) lowered in the forwarded body
        got = await key_object(shrinking, key["id"])
        assert (got["spend"], got["reserved"]) == (0.3, 0)
        assert got["spend"] <= got["max_budget"]
        (entry,) = await ledger(shrinking, key["id"])
        assert (entry["completion_tokens"], entry["overrun"]) == (300, 0)


async def test_every_output_field_is_lowered_and_small_rooms_are_refused(
    shrinking: Gateway, mock_upstream: ServerThread
) -> None:
    key = await shrinking.create_key(max_budget=0.5)
    r = await shrinking.client.post(
        "/v1/chat/completions",
        json={
            "model": "bg-test",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 900,
            "max_completion_tokens": 1000,
        },
        headers=bearer(key["key"]),
    )
    assert r.status_code == 200, r.text
    assert r.headers[LIMITED] == "500"
    sent = (await mock_stats(mock_upstream.url))["last_body"]
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (500, 500)
    # $0 left: not even BUDGETGATE_MIN_OUTPUT_TOKENS (256) fits.
    r = await shrinking.chat(key["key"], max_tokens=None)
    assert r.status_code == 429, r.text
    # A request that fits is not touched.
    roomy = await shrinking.create_key(max_budget=10)
    r = await shrinking.chat(roomy["key"], max_tokens=50)
    assert r.status_code == 200 and LIMITED not in r.headers


async def test_off_by_default(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=0.3005)
    r = await gateway.chat(key["key"], max_tokens=None)
    assert r.status_code == 429, r.text
    assert LIMITED not in r.headers


async def test_a_key_chooses_for_itself(
    gateway: Gateway, shrinking: Gateway, mock_upstream: ServerThread
) -> None:
    """`shrink_to_fit` on a key overrides BUDGETGATE_SHRINK_TO_FIT either way; a key that turns
    it off is refused on its next request (one `rejected` entry, nothing left reserved), even
    though the process last saw it on."""
    on = await gateway.create_key(max_budget=0.3005, shrink_to_fit=True)
    assert on["shrink_to_fit"] is True
    r = await gateway.chat(on["key"], max_tokens=None)
    assert (r.status_code, r.headers.get(LIMITED)) == (200, "300"), r.text

    off = await shrinking.create_key(max_budget=0.3005, shrink_to_fit=False)
    r = await shrinking.chat(off["key"], max_tokens=None)
    assert r.status_code == 429 and LIMITED not in r.headers

    flips = await gateway.create_key(max_budget=0.6005, shrink_to_fit=True)
    r = await gateway.chat(flips["key"], max_tokens=None)
    assert (r.status_code, r.headers.get(LIMITED)) == (200, "600"), r.text
    more = await gateway.admin("PATCH", f"/admin/keys/{flips['id']}", json={"max_budget": 0.9005})
    assert more.status_code == 200, more.text
    r = await gateway.admin("PATCH", f"/admin/keys/{flips['id']}", json={"shrink_to_fit": False})
    assert r.json()["shrink_to_fit"] is False
    r = await gateway.chat(flips["key"], max_tokens=None)
    assert r.status_code == 429, r.text
    assert "Budget exceeded" in r.json()["error"]["message"]
    got = await key_object(gateway, flips["id"])
    assert (got["spend"], got["reserved"]) == (0.6, 0)
    assert [e["outcome"] for e in await ledger(gateway, flips["id"])] == ["rejected", "ok"]

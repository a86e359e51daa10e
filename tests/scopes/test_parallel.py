"""max_parallel_requests (SPEC 11): requests in flight at once, counted in the ledger (a
budget of unit `parallel`: held at admission, released at settlement, never spent), so exact
across replicas; a request over it gets 429 parallel_limit_exceeded without retry-after."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from app.clock import ManualClock
from app.ledger.repository import reconcile
from tests.conftest import START, make_settings, running_gateway
from tests.scopes.helpers import budget, chat, join, owner, periods_of
from tests.servers import ServerThread


class SlowUpstream:
    """An OpenAI-compatible upstream that answers after a while and counts the requests it
    holds at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.now = self.most = self.served = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            with self.lock:
                self.now -= 1
                self.served += 1
        body = orjson.dumps(
            {
                "id": "chatcmpl-slow",
                "object": "chat.completion",
                "model": "bg-test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def slow_upstream() -> Iterator[tuple[SlowUpstream, ServerThread]]:
    app = SlowUpstream(0.3)
    server = ServerThread(app).start()
    yield app, server
    server.stop()


@pytest.mark.parametrize("scope", ["key", "team"])
async def test_never_more_than_max_parallel_requests_reach_the_upstream(
    database_url: str, slow_upstream: tuple[SlowUpstream, ServerThread], scope: str
) -> None:
    upstream, server = slow_upstream
    settings = make_settings(database_url, server.url)
    async with running_gateway(settings, ManualClock(START)) as gw:
        keys = [await gw.create_key(alias=f"k{i}", max_budget=10) for i in range(3)]
        if scope == "team":
            team = await owner(gw, "team", "ml")
            for key in keys:
                await join(gw, key["id"], team)
            limit = await budget(gw, "team", team, 5, unit="parallel", kind="parallel")
        else:
            keys = keys[:1]
            limit = await budget(gw, "key", keys[0]["id"], 5, unit="parallel", kind="parallel")
        results = await asyncio.gather(*(chat(gw, keys[i % len(keys)]["key"]) for i in range(30)))
        statuses = [r.status_code for r in results]
        refused = [r for r in results if r.status_code == 429]
        assert upstream.most <= 5, upstream.most
        assert statuses.count(200) == upstream.served >= 5
        assert refused and len(refused) + statuses.count(200) == 30
        for r in refused:
            assert r.json()["error"]["code"] == "parallel_limit_exceeded", r.text
            assert "retry-after" not in r.headers
        # Released: nothing in flight, nothing spent; and again 5 at once.
        [period] = await periods_of(gw, limit)
        assert (period["spend"], period["reserved"]) == (0, 0)
        again = await asyncio.gather(*(chat(gw, keys[0]["key"]) for _ in range(5)))
        assert [r.status_code for r in again] == [200] * 5
        report = await reconcile(gw.state.engine)
        assert report.ok, report


async def test_an_abandoned_request_is_charged_in_each_unit(gateway: Any) -> None:
    """The sweeper charges a request its gateway never settled: its dollars reservation, one
    request, and nothing to a parallel limit (its hold is released)."""
    from datetime import timedelta

    from tests.budgets.helpers import admit

    gw = gateway
    key = await gw.create_key(alias="k", max_budget=1)
    parallel = await budget(gw, "key", key["id"], 2, unit="parallel", kind="parallel")
    requests = await budget(gw, "key", key["id"], 10, unit="requests", duration="1d")
    flight = await admit(gw, key["key"], 5_000_000)
    assert flight.admitted
    gw.clock.advance(timedelta(seconds=gw.settings.reservation_ttl_seconds + 1))
    assert await gw.state.budgets.sweep_expired_reservations() == 1
    [p] = await periods_of(gw, parallel)
    assert (p["spend"], p["reserved"]) == (0, 0)
    [r] = await periods_of(gw, requests)
    assert (r["spend"], r["reserved"]) == (1, 0)
    got = (await gw.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert (got["spend"], got["reserved"]) == (0.005, 0)
    report = await reconcile(gw.state.engine)
    assert report.ok, report

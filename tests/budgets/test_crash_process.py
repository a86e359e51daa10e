"""A real gateway process SIGKILLed with requests in flight (SPEC 5): restarted with a short
BUDGETGATE_RESERVATION_TTL_SECONDS, its sweeper settles each request as `abandoned`, charged its
full reservation (`cost_source=reservation`), and `budgetgate reconcile` is clean. On SQLite and
PostgreSQL; a few seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Fleet, auth, chat_body

pytestmark = pytest.mark.process

TTL = "BUDGETGATE_RESERVATION_TTL_SECONDS"
RESET = "BUDGETGATE_RESET_INTERVAL_SECONDS"
IN_FLIGHT = 6  # half streamed, half not; each reserves $0.05 (50 output tokens)


async def until(check: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    for _ in range(int(seconds / 0.1)):
        if value := await check():
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {seconds} s: {what}")


async def test_requests_in_flight_at_a_crash_are_charged_their_reservation(
    database_url: str, tmp_path: Path
) -> None:
    with Fleet(tmp_path, database_url, replicas=1, env={TTL: "60", RESET: "0.5"}) as fleet:
        gw = fleet.gateways[0]
        async with httpx.AsyncClient(timeout=60) as client:
            key = await fleet.create_key(client, max_budget=1, budget_duration="1mo")

            async def state() -> dict[str, Any]:
                r = await fleet.admin(client, "GET", f"/admin/keys/{key['id']}")
                assert r.status_code == 200, r.text
                return r.json()  # type: ignore[no-any-return]

            async def hanging(stream: bool) -> None:
                # the upstream never answers: the request is admitted and held when we kill
                await client.post(
                    gw.url + "/v1/chat/completions",
                    json=chat_body(max_tokens=50, stream=stream),
                    headers=auth(key["key"], **{"x-mock-hang": "1"}),
                )

            tasks = [asyncio.create_task(hanging(n % 2 == 0)) for n in range(IN_FLIGHT)]
            await until(lambda: _reserved_is(state, 0.05 * IN_FLIGHT), "every request admitted")
            gw.kill()
            crashed = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(c, httpx.HTTPError) for c in crashed), crashed
            gw.start(env={TTL: "1", RESET: "0.5"})
            after = await until(lambda: _reserved_is(state, 0), "the sweep")

            r = await fleet.admin(client, "GET", f"/admin/ledger?key_id={key['id']}")
            entries = r.json()["data"]
        reconciled = fleet.reconcile()

    assert len(entries) == IN_FLIGHT
    assert {(e["outcome"], e["cost"], e["cost_source"], e["overrun"]) for e in entries} == {
        ("abandoned", 0.05, "reservation", 0.0)
    }
    assert sorted(e["stream"] for e in entries) == [False] * 3 + [True] * 3
    assert round(after["spend"], 9) == 0.3 and after["remaining"] == 0.7
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "ledger is consistent" in reconciled.stdout


async def _reserved_is(state: Callable[[], Any], dollars: float) -> dict[str, Any] | None:
    current = await state()
    return current if round(current["reserved"], 9) == round(dollars, 9) else None

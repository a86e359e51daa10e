"""SPEC 12 alert thresholds (`alert_at`): each fraction of max_budget a period's spend reaches is
POSTed once per period (re-armed by the next period, or a reset), whichever budget of the key,
and once however many replicas run the scheduler's pass at the same moment. Both ledgers; a
real HTTP receiver; bg-test costs $0.001 per output token, so `max_tokens=10` spends $0.01."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from app.alerts.service import AlertService
from app.db import create_engine
from app.scheduler import run_alerts
from tests.alerts.helpers import Receiver, alerts
from tests.conftest import Gateway, make_settings, running_gateway
from tests.servers import ServerThread


def reached(receiver: Receiver, key: dict[str, Any]) -> list[float]:
    return [e["threshold"] for e in receiver.of("threshold") if e["key_id"] == key["id"]]


async def test_each_threshold_alerts_once_when_the_spend_reaches_it_and_again_next_period(
    gw: Gateway, receiver: Receiver
) -> None:
    key = await gw.create_key(
        alias="team-a", max_budget=0.1, budget_duration="1d", alert_at=[0.5, 0.8, 1.0]
    )
    quiet = await gw.create_key(max_budget=0.1, budget_duration="1d", alert_at=[0.5, 0.8, 1.0])
    assert (await gw.chat(quiet["key"], max_tokens=40)).status_code == 200  # 40 %: no alert
    expected = {5: [0.5], 8: [0.5, 0.8], 10: [0.5, 0.8, 1.0]}
    fired: list[float] = []
    for cents in range(1, 11):
        assert (await gw.chat(key["key"])).status_code == 200
        await run_alerts(alerts(gw))
        fired = expected.get(cents, fired)
        assert reached(receiver, key) == fired, cents
    assert await run_alerts(alerts(gw)) == (0, 0)
    assert reached(receiver, quiet) == []
    half = receiver.of("threshold")[0]
    assert {k: v for k, v in half.items() if k not in ("id", "budget_id")} == {
        "type": "budget.threshold",
        "threshold": 0.5,
        "spend": 0.05,
        "max_budget": 0.1,
        "scope": "key",
        "owner_id": key["id"],
        "owner_name": "team-a",
        "unit": "usd",
        "key_id": key["id"],
        "alias": "team-a",
        "key_prefix": key["key_prefix"],
        "budget_duration": "1d",
        "period_start": key["period_start"],
        "period_end": key["reset_at"],
        "created_at": "2026-01-15T12:00:00Z",
    }
    assert half["id"].startswith("alert_") and half["budget_id"].startswith("bud_")
    assert [e["spend"] for e in receiver.of("threshold")] == [0.05, 0.08, 0.1]
    assert receiver.of("soft_budget_crossed") == []

    gw.clock.advance(24 * 3600)  # the next period: re-armed; one step past two thresholds
    assert (await gw.chat(key["key"], max_tokens=85)).status_code == 200
    assert await run_alerts(alerts(gw)) == (2, 2)
    # (one pass records both: the order they are POSTed in is not defined)
    assert reached(receiver, key)[:3] == [0.5, 0.8, 1.0]
    assert sorted(reached(receiver, key)[3:]) == [0.5, 0.8]
    assert [e["spend"] for e in receiver.of("threshold")[3:]] == [0.085, 0.085]
    assert receiver.of("threshold")[3]["period_start"] == key["reset_at"]


async def test_each_budget_of_a_key_has_its_own_thresholds(
    gw: Gateway, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    key = await gw.create_key(
        max_budget=1,
        alert_at=[0.5],
        budgets=[{"max_budget": 0.02, "budget_duration": "1d", "alert_at": [0.5, 0.75]}],
    )
    assert (await gw.chat(key["key"])).status_code == 200  # $0.01: half of the daily window
    assert await run_alerts(alerts(gw)) == (1, 1)
    (event,) = receiver.of("threshold")
    assert (event["budget_id"], event["threshold"]) == (key["budgets"][0]["budget_id"], 0.5)
    assert (event["max_budget"], event["budget_duration"]) == (0.02, "1d")
    delivered = [r.getMessage() for r in caplog.records if r.name == "budgetgate.alerts"]
    assert delivered == [f"budget alert {event['id']} delivered: budget.threshold"]


async def test_changed_thresholds_alert_what_is_new_and_never_repeat(
    gw: Gateway, receiver: Receiver
) -> None:
    key = await gw.create_key(max_budget=0.1, alert_at=[0.1])
    assert (await gw.chat(key["key"], max_tokens=30)).status_code == 200
    assert await run_alerts(alerts(gw)) == (1, 1)
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"alert_at": [0.1, 0.2, 0.5]})
    assert r.status_code == 200, r.text
    assert await run_alerts(alerts(gw)) == (1, 1)  # 0.2 is new and reached; 0.1 was sent
    assert reached(receiver, key) == [0.1, 0.2]
    # A lowered limit: the same spend is now a larger fraction of it.
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0.05})
    assert r.status_code == 200, r.text
    assert await run_alerts(alerts(gw)) == (1, 1)
    assert reached(receiver, key) == [0.1, 0.2, 0.5]
    assert [e["max_budget"] for e in receiver.of("threshold")] == [0.1, 0.1, 0.05]
    # A key frozen with max_budget 0 is past every threshold, and approaches none: no alert.
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"alert_at": [0.6, 0.7]})
    assert r.status_code == 200, r.text
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0})
    assert r.status_code == 200, r.text
    assert await run_alerts(alerts(gw)) == (0, 0)


async def test_a_reset_rearms_the_thresholds_and_the_closed_period_still_alerts(
    gw: Gateway, receiver: Receiver
) -> None:
    key = await gw.create_key(max_budget=0.1, budget_duration="1mo", alert_at=[0.5, 0.8])
    assert (await gw.chat(key["key"], max_tokens=60)).status_code == 200  # 60 %; no pass yet
    r = await gw.admin("POST", f"/admin/keys/{key['id']}/reset")
    assert r.status_code == 200 and r.json()["spend"] == 0.0, r.text
    assert await run_alerts(alerts(gw)) == (1, 1)  # reached before the reset: still told
    assert (await gw.chat(key["key"], max_tokens=90)).status_code == 200
    assert await run_alerts(alerts(gw)) == (2, 2)
    assert await run_alerts(alerts(gw)) == (0, 0)
    first, *after = receiver.of("threshold")
    assert first["threshold"] == 0.5 and sorted(e["threshold"] for e in after) == [0.5, 0.8]
    assert (first["spend"], after[0]["spend"], after[1]["spend"]) == (0.06, 0.09, 0.09)
    assert first["period_start"] == key["period_start"]
    assert after[0]["period_start"] == after[1]["period_start"] == "2026-01-15T12:00:00Z"  # reset


async def test_three_replicas_passing_at_once_alert_each_threshold_once(
    postgres_url: str, mock_upstream: ServerThread, clock: Any, receiver: Receiver
) -> None:
    """Three gateway replicas (each its own engine and connection pool) run the scheduler's pass
    at the same moment on one PostgreSQL. The outbox table is held in SHARE mode until all three
    have read what is due and wait to record it: every one of them records the same alerts, and
    only the database's uniqueness keeps each threshold to one row and one POST."""
    receiver.reset()
    settings = make_settings(postgres_url, mock_upstream.url, alert_webhook_url=receiver.url)
    async with running_gateway(settings, clock) as gw:
        keys = [
            await gw.create_key(max_budget=0.1, budget_duration="1d", alert_at=[0.5, 0.8, 1.0])
            for _ in range(4)
        ]
        for key in keys:
            assert (await gw.chat(key["key"], max_tokens=100)).status_code == 200
        engines = [create_engine(settings) for _ in range(3)]
        replicas = [AlertService.from_settings(engine, clock, settings) for engine in engines]
        blocker = create_engine(settings)
        try:
            async with blocker.connect() as conn:
                await conn.execute(text("LOCK TABLE budget_alerts IN SHARE MODE"))
                passes = [asyncio.create_task(run_alerts(r)) for r in replicas]
                await _until_waiting_for_locks(blocker, 3)
                await conn.commit()
            results = await asyncio.gather(*passes)
            again = await asyncio.gather(*(run_alerts(r) for r in replicas))
        finally:
            for replica in replicas:
                await replica.close()
            for engine in [*engines, blocker]:
                await engine.dispose()
    assert sum(recorded for recorded, _ in results) == 12
    assert sum(sent for _, sent in results) == 12
    assert again == [(0, 0)] * 3
    events = receiver.of("threshold")
    assert sorted((e["key_id"], e["threshold"]) for e in events) == sorted(
        (k["id"], t) for k in keys for t in (0.5, 0.8, 1.0)
    )


async def _until_waiting_for_locks(engine: Any, sessions: int) -> None:
    query = text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    for _ in range(500):
        async with engine.connect() as conn:
            if (await conn.execute(query)).scalar() >= sessions:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{sessions} sessions never waited for the outbox's lock")

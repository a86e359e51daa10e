"""SPEC 8 budget alerts: a soft budget crossed, a budget exhausted; each POSTed to the webhook
exactly once per period per budget (re-armed by the next period), with retries, off the
request path. Both ledgers; a real HTTP receiver."""

from __future__ import annotations

import asyncio
from typing import Any

from app.alerts.service import AlertService
from app.scheduler import _safe_run, run_alerts
from tests.alerts.helpers import Receiver, alerts, until
from tests.budgets.helpers import chat_billed
from tests.conftest import Gateway, make_settings, running_gateway
from tests.servers import ServerThread


async def test_soft_budget_alerts_once_per_period_and_again_next_period(
    gw: Gateway, receiver: Receiver
) -> None:
    key = await gw.create_key(alias="team-a", max_budget=1, soft_budget=0.015, budget_duration="1d")
    assert (await gw.chat(key["key"])).status_code == 200  # $0.01: under the soft budget
    assert await run_alerts(alerts(gw)) == (0, 0)
    for _ in range(3):  # $0.02, 0.03, 0.04: crossed once
        assert (await gw.chat(key["key"])).status_code == 200
        await run_alerts(alerts(gw))
    assert await run_alerts(alerts(gw)) == (0, 0)
    (event,) = receiver.of("soft_budget_crossed")
    assert event["key_id"] == key["id"] and event["alias"] == "team-a"
    assert event["soft_budget"] == 0.015 and event["max_budget"] == 1.0
    assert event["spend"] == 0.02 and event["id"].startswith("alert_")
    assert event["period_end"] == key["reset_at"]

    gw.clock.advance(24 * 3600)  # the next period: re-armed
    assert (await gw.chat(key["key"])).status_code == 200
    assert (await gw.chat(key["key"])).status_code == 200
    assert await run_alerts(alerts(gw)) == (1, 1)
    first, second = receiver.of("soft_budget_crossed")
    assert second["period_start"] == first["period_end"]


async def test_a_crossing_in_a_period_that_ended_before_the_pass_is_still_alerted(
    gw: Gateway, receiver: Receiver
) -> None:
    old = await gw.create_key(max_budget=1, soft_budget=0.015, budget_duration="1d")
    for _ in range(2):  # $0.02: crossed, and no pass before its period ends
        assert (await gw.chat(old["key"])).status_code == 200
    gw.clock.advance(24 * 3600)
    assert (await gw.chat(old["key"])).status_code == 200  # rolls: the new period has $0.01
    gw.clock.advance(2 * 3600)  # closed over an hour ago: history, not alerted
    assert await run_alerts(alerts(gw)) == (0, 0)

    key = await gw.create_key(max_budget=1, soft_budget=0.015, budget_duration="1d")
    for _ in range(2):
        assert (await gw.chat(key["key"])).status_code == 200
    gw.clock.advance(24 * 3600)
    assert (await gw.chat(key["key"])).status_code == 200
    assert await run_alerts(alerts(gw)) == (1, 1)
    (event,) = receiver.of("soft_budget_crossed")
    assert event["key_id"] == key["id"] and event["spend"] == 0.02
    assert event["period_end"] == key["reset_at"]
    assert await run_alerts(alerts(gw)) == (0, 0)


async def test_soft_budget_zero_alerts_on_the_first_spend(gw: Gateway, receiver: Receiver) -> None:
    key = await gw.create_key(max_budget=1, soft_budget=0)
    assert await run_alerts(alerts(gw)) == (0, 0)  # nothing spent yet
    assert (await gw.chat(key["key"])).status_code == 200
    assert await run_alerts(alerts(gw)) == (1, 1)
    assert [e["spend"] for e in receiver.of("soft_budget_crossed")] == [0.01]


async def test_exhausted_alerts_once_from_the_refusals_without_waiting_for_them(
    gw: Gateway, receiver: Receiver
) -> None:
    key = await gw.create_key(alias="small", max_budget=0.015)
    assert (await gw.chat(key["key"])).status_code == 200
    receiver.gate.clear()  # the webhook holds every POST: a request waiting for it would hang
    refused = await asyncio.gather(*(gw.chat(key["key"]) for _ in range(5)))
    assert [r.status_code for r in refused] == [429] * 5
    assert receiver.events == []  # answered while the alert was still on its way
    receiver.gate.set()
    await until(lambda: receiver.of("exhausted"))
    assert await run_alerts(alerts(gw)) == (0, 0)
    assert (await gw.chat(key["key"])).status_code == 429
    await asyncio.sleep(0.2)
    (event,) = receiver.of("exhausted")
    assert (event["key_id"], event["spend"], event["max_budget"]) == (key["id"], 0.01, 0.015)
    assert event["period_end"] is None  # a lifetime budget


async def test_each_overrun_alerts_once_per_request(gw: Gateway, receiver: Receiver) -> None:
    """Not once per period: every request charged more than it reserved is an event, telling
    the key, the period, the request, its reservation, its cost and the excess."""
    key = await gw.create_key(alias="over", max_budget=1, budget_duration="1mo")
    assert (await chat_billed(gw, key, "0.01")).status_code == 200  # what it reserved: no event
    assert await run_alerts(alerts(gw)) == (0, 0)
    first = await chat_billed(gw, key, "0.03")
    second = await chat_billed(gw, key, "0.015")
    assert first.status_code == second.status_code == 200
    assert await run_alerts(alerts(gw)) == (2, 2)
    assert await run_alerts(alerts(gw)) == (0, 0)  # once each
    events = sorted(receiver.of("overrun"), key=lambda e: e["cost"])
    assert [e["request_id"] for e in events] == [
        second.headers["x-request-id"],
        first.headers["x-request-id"],
    ]
    assert [(e["reservation"], e["cost"], e["overrun"]) for e in events] == [
        (0.01, 0.015, 0.005),
        (0.01, 0.03, 0.02),
    ]
    for e in events:
        assert (e["key_id"], e["alias"], e["key_prefix"]) == (key["id"], "over", key["key_prefix"])
        assert (e["period_start"], e["period_end"]) == (key["period_start"], key["reset_at"])
        assert e["max_budget"] == 1.0 and e["id"].startswith("alert_")
    assert receiver.of("soft_budget_crossed") == receiver.of("exhausted") == []


async def test_a_failing_webhook_is_retried_until_it_takes_the_alert(
    gw: Gateway, receiver: Receiver
) -> None:
    key = await gw.create_key(max_budget=1, soft_budget=0.005, budget_duration="1mo")
    receiver.fail = 2
    assert (await gw.chat(key["key"])).status_code == 200
    assert await run_alerts(alerts(gw)) == (1, 0)  # recorded; the POST got a 500
    assert await run_alerts(alerts(gw)) == (0, 0)  # not due yet (backoff)
    gw.clock.advance(120)
    assert await run_alerts(alerts(gw)) == (0, 0)  # the second 500
    gw.clock.advance(120)
    assert await run_alerts(alerts(gw)) == (0, 1)
    gw.clock.advance(3600)
    assert await run_alerts(alerts(gw)) == (0, 0)  # delivered: never again
    assert len(receiver.of("soft_budget_crossed")) == 1


async def test_replicas_racing_record_each_alert_once(gw: Gateway, receiver: Receiver) -> None:
    """Several processes' passes at once (separate services on one database): one alert."""
    keys = [await gw.create_key(max_budget=1, soft_budget=0.005) for _ in range(3)]
    for key in keys:
        assert (await gw.chat(key["key"])).status_code == 200
    replicas = [AlertService(gw.app.state.engine, gw.clock, alerts(gw).webhook_url) for _ in "abcd"]
    try:
        results = await asyncio.gather(*(run_alerts(r) for r in replicas))
    finally:
        for r in replicas:
            await r.close()
    assert sum(recorded for recorded, _ in results) == 3
    assert sum(sent for _, sent in results) == 3
    assert sorted(e["key_id"] for e in receiver.of("soft_budget_crossed")) == sorted(
        k["id"] for k in keys
    )


async def test_without_a_webhook_nothing_is_recorded(
    database_url: str, mock_upstream: ServerThread, clock: Any
) -> None:
    async with running_gateway(make_settings(database_url, mock_upstream.url), clock) as gw:
        key = await gw.create_key(max_budget=0.005, soft_budget=0)
        assert (await gw.chat(key["key"], max_tokens=1)).status_code == 200
        assert (await gw.chat(key["key"])).status_code == 429
        assert await run_alerts(alerts(gw)) == (0, 0)


async def test_the_scheduler_pass_records_and_sends(gw: Gateway, receiver: Receiver) -> None:
    """The job every replica runs each BUDGETGATE_RESET_INTERVAL_SECONDS includes the alerts."""
    key = await gw.create_key(max_budget=1, soft_budget=0)
    assert (await gw.chat(key["key"])).status_code == 200
    await _safe_run(gw.app.state.budgets, alerts(gw))
    assert [e["key_id"] for e in receiver.of("soft_budget_crossed")] == [key["id"]]

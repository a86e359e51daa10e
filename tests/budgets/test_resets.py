"""The budget ledger around resets (SPEC 5): the seed scenario (LiteLLM's budgets that stopped
being enforced, or stayed stuck, after a reset), missed periods, manual resets, settings
changes, lifetime budgets and timezones. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from app.ledger.contract import Outcome
from app.scheduler import run_maintenance
from tests.budgets.helpers import (
    admit,
    assert_budget_exceeded,
    assert_reconciled,
    get_key,
    ledger,
    money,
    periods,
    settle,
    spend_to_limit,
    when,
)
from tests.conftest import Gateway


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# -- 1. the seed scenario -------------------------------------------------------------------


@pytest.mark.parametrize("reset_by", ["scheduler", "request"])
async def test_monthly_budget_is_enforced_again_in_every_period(
    gateway: Gateway, reset_by: str
) -> None:
    gw = gateway
    key = await gw.create_key(alias="seed-team", max_budget=1.00, budget_duration="1mo")
    assert key["reset_at"] == "2026-02-01T00:00:00Z"
    assert when(key["period_start"]) == utc(2026, 1, 1)

    # Clock positions, one per period; the second transition lands exactly on the boundary
    # (periods are [start, end): a request at the reset instant is in the new period).
    moves = [
        None,
        (utc(2026, 2, 3, 9, 30), "2026-03-01T00:00:00Z"),
        (utc(2026, 3, 1), "2026-04-01T00:00:00Z"),
    ]
    reset_at = "2026-02-01T00:00:00Z"
    for move in moves:
        if move is not None:
            target, reset_at = move
            gw.clock.set(target)
            if reset_by == "scheduler":
                assert await run_maintenance(gw.state.budgets) == (1, 0)
                # Idempotent: a second pass (another replica) finds nothing to do.
                assert await run_maintenance(gw.state.budgets) == (0, 0)
                after = await get_key(gw, key["id"])
                assert after["spend"] == 0.0
                assert after["reset_at"] == reset_at

        await spend_to_limit(gw, key)  # 10 x $0.10, the first one admitted after the reset
        r = await gw.chat(key["key"], max_tokens=100)
        assert_budget_exceeded(
            r, key, spend="1.0", max_budget="1.0", reset_at=reset_at, now=gw.clock.now()
        )
        # A reached budget blocks everything, even a request costing $0.001.
        r = await gw.chat(key["key"], max_tokens=1)
        assert r.status_code == 429, r.text

        state = await get_key(gw, key["id"])
        assert state["max_budget"] == 1.0  # a reset never touches the settings
        assert state["budget_duration"] == "1mo"
        assert state["spend"] == 1.0
        assert state["reserved"] == 0.0
        assert state["remaining"] == 0.0
        assert state["reset_at"] == reset_at

    # Into April: admitted again, a fourth period opened.
    gw.clock.set(utc(2026, 4, 1, 0, 0, 5))
    if reset_by == "scheduler":
        assert await run_maintenance(gw.state.budgets) == (1, 0)
    r = await gw.chat(key["key"], max_tokens=100)
    assert r.status_code == 200, r.text
    assert money(r.headers["x-budget-spend"]) == money("0.1")
    assert r.headers["x-budget-reset-at"] == "2026-05-01T00:00:00Z"

    history = await periods(gw, key["id"])
    bounds = [(when(p["period_start"]), when(p["period_end"])) for p in history]
    assert bounds == [
        (utc(2026, 1, 1), utc(2026, 2, 1)),
        (utc(2026, 2, 1), utc(2026, 3, 1)),
        (utc(2026, 3, 1), utc(2026, 4, 1)),
        (utc(2026, 4, 1), utc(2026, 5, 1)),
    ]
    closed, current = history[:-1], history[-1]
    for p in closed:
        assert p["spend"] == 1.0  # exactly max_budget, never more
        assert p["max_budget"] == 1.0
        assert p["close_reason"] == "expired"
        assert when(p["closed_at"]) >= when(p["period_end"])
    assert current["closed_at"] is None and current["close_reason"] is None
    assert current["spend"] == pytest.approx(0.1) and current["max_budget"] == 1.0
    assert sum(p["closed_at"] is None for p in history) == 1

    assert (await get_key(gw, key["id"]))["max_budget"] == 1.0
    entries = await ledger(gw, key["id"])
    outcomes = [e["outcome"] for e in entries]
    assert outcomes.count("ok") == 31
    assert outcomes.count("rejected") == 6
    assert sum(money(e["cost"]) for e in entries) == money("3.1")
    await assert_reconciled(gw)


# -- 2. periods missed while down ------------------------------------------------------------


@pytest.mark.parametrize("reset_by", ["scheduler", "request"])
async def test_periods_missed_while_down_are_skipped(gateway: Gateway, reset_by: str) -> None:
    gw = gateway
    key = await gw.create_key(alias="sleeper", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key)
    assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429

    gw.clock.set(utc(2026, 4, 20, 8))  # three boundaries passed at once
    if reset_by == "scheduler":
        assert await run_maintenance(gw.state.budgets) == (1, 0)
    r = await gw.chat(key["key"], max_tokens=100)
    assert r.status_code == 200, r.text
    assert r.headers["x-budget-reset-at"] == "2026-05-01T00:00:00Z"

    state = await get_key(gw, key["id"])
    assert when(state["period_start"]) == utc(2026, 4, 1)
    assert state["reset_at"] == "2026-05-01T00:00:00Z"
    history = await periods(gw, key["id"])
    # No empty February/March periods: January closed, April open.
    assert [(p["period_start"], p["close_reason"]) for p in history] == [
        ("2026-01-01T00:00:00Z", "expired"),
        ("2026-04-01T00:00:00Z", None),
    ]
    await assert_reconciled(gw)


# -- 3. manual reset -------------------------------------------------------------------------


async def test_manual_reset_keeps_the_scheduled_boundary(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="manual", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key)
    assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429

    gw.clock.advance(timedelta(days=3))
    reset_time = gw.clock.now()
    r = await gw.admin("POST", f"/admin/keys/{key['id']}/reset")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["spend"] == 0.0 and out["reserved"] == 0.0 and out["remaining"] == 1.0
    assert out["max_budget"] == 1.0
    assert out["reset_at"] == "2026-02-01T00:00:00Z"  # the same scheduled boundary
    assert when(out["period_start"]) == reset_time

    history = await periods(gw, key["id"])
    assert len(history) == 2
    old, new = history
    assert old["close_reason"] == "manual"
    assert when(old["closed_at"]) == reset_time
    assert old["spend"] == 1.0 and old["max_budget"] == 1.0
    assert new["closed_at"] is None and new["spend"] == 0.0
    assert new["period_end"] == "2026-02-01T00:00:00Z"

    await spend_to_limit(gw, key)  # a whole budget again
    r = await gw.chat(key["key"], max_tokens=100)
    assert_budget_exceeded(
        r, key, spend="1.0", max_budget="1.0", reset_at="2026-02-01T00:00:00Z", now=reset_time
    )

    # The schedule is untouched: February starts on the 1st as planned.
    gw.clock.set(utc(2026, 2, 1, 0, 0, 1))
    r = await gw.chat(key["key"], max_tokens=100)
    assert r.status_code == 200, r.text
    assert r.headers["x-budget-reset-at"] == "2026-03-01T00:00:00Z"
    history = await periods(gw, key["id"])
    assert [p["close_reason"] for p in history] == ["manual", "expired", None]
    assert history[-1]["period_start"] == "2026-02-01T00:00:00Z"

    r = await gw.admin("POST", "/admin/keys/key_doesnotexist/reset")
    assert r.status_code == 404, r.text
    await assert_reconciled(gw)


# -- 4. settings changes ---------------------------------------------------------------------


async def test_max_budget_change_applies_on_the_next_request(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="patched", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key, n=3)  # $0.30

    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0.35})
    assert r.status_code == 200, r.text
    assert r.json()["max_budget"] == 0.35 and r.json()["spend"] == pytest.approx(0.3)
    r = await gw.chat(key["key"], max_tokens=100)  # $0.30 + $0.10 > $0.35
    assert r.status_code == 429, r.text
    assert money(r.headers["x-budget-max-budget"]) == money("0.35")
    assert (await gw.chat(key["key"], max_tokens=50)).status_code == 200  # exactly to $0.35
    r = await gw.chat(key["key"], max_tokens=1)  # spend == max_budget blocks everything
    assert r.status_code == 429, r.text

    # Down to 0: every request is blocked, even the cheapest one.
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0})
    assert r.status_code == 200, r.text
    assert r.json()["max_budget"] == 0.0
    assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429

    # Raised again: requests pass on the very next request, in the same period.
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 2.0})
    assert r.status_code == 200, r.text
    r = await gw.chat(key["key"], max_tokens=100)
    assert r.status_code == 200, r.text
    assert money(r.headers["x-budget-spend"]) == money("0.45")
    assert money(r.headers["x-budget-max-budget"]) == money("2.0")

    history = await periods(gw, key["id"])
    assert len(history) == 1  # changing max_budget never closes the period
    assert history[0]["max_budget"] == 2.0
    await assert_reconciled(gw)


async def test_zero_budget_blocks_every_request(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="zero", max_budget=0, budget_duration="1d")
    r = await gw.chat(key["key"], max_tokens=1)
    assert_budget_exceeded(
        r, key, spend="0", max_budget="0", reset_at="2026-01-16T00:00:00Z", now=gw.clock.now()
    )
    # Not even a new period helps: the limit is 0 in every period.
    gw.clock.advance(timedelta(days=2))
    assert await run_maintenance(gw.state.budgets) == (1, 0)
    assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429
    entries = await ledger(gw, key["id"])
    assert [e["outcome"] for e in entries] == ["rejected", "rejected"]
    await assert_reconciled(gw)


async def test_duration_change_rebounds_the_period_and_keeps_its_spend(gateway: Gateway) -> None:
    """SPEC 5: the open period keeps its spend and ends at the new schedule's next boundary;
    a key over the new cap is blocked until then, not for a whole new window (PEER-FAILURES
    #34270), and changing the schedule spends nothing again."""
    gw = gateway
    key = await gw.create_key(alias="rescheduled", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key)
    assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429

    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"budget_duration": "1d"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["budget_duration"] == "1d"
    assert out["max_budget"] == 1.0
    assert out["spend"] == 1.0
    assert out["period_start"] == key["period_start"]
    assert out["reset_at"] == "2026-01-16T00:00:00Z"  # the new schedule: daily, at midnight

    r = await gw.chat(key["key"], max_tokens=1)
    assert r.status_code == 429, r.text
    assert r.headers["x-budget-reset-at"] == "2026-01-16T00:00:00Z"
    history = await periods(gw, key["id"])
    assert [(p["close_reason"], p["spend"]) for p in history] == [(None, 1.0)]

    # The new schedule rolls daily from its boundary.
    gw.clock.set(utc(2026, 1, 16, 0, 0, 1))
    assert await run_maintenance(gw.state.budgets) == (1, 0)
    state = await get_key(gw, key["id"])
    assert state["period_start"] == "2026-01-16T00:00:00Z"
    assert state["reset_at"] == "2026-01-17T00:00:00Z"
    assert state["spend"] == 0.0
    history = await periods(gw, key["id"])
    assert [(p["close_reason"], p["spend"]) for p in history] == [("expired", 1.0), (None, 0.0)]
    await assert_reconciled(gw)


async def test_timezone_change_rebounds_the_period_and_keeps_its_spend(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="tz", max_budget=1.0, budget_duration="1d")
    await spend_to_limit(gw, key, n=2)
    r = await gw.admin(
        "PATCH", f"/admin/keys/{key['id']}", json={"budget_timezone": "America/New_York"}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["budget_timezone"] == "America/New_York"
    assert out["spend"] == 0.2
    assert out["period_start"] == key["period_start"]
    assert out["reset_at"] == "2026-01-16T05:00:00Z"  # New York midnight (EST, UTC-5)
    history = await periods(gw, key["id"])
    assert [(p["close_reason"], p["spend"]) for p in history] == [(None, 0.2)]
    await assert_reconciled(gw)


async def test_anchor_change_rebounds_the_period_and_keeps_its_spend(gateway: Gateway) -> None:
    """A boundary earlier or later than the old one, the spend and reservations stay: a request
    in flight settles into the same period."""
    gw = gateway
    key = await gw.create_key(alias="anchor", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key, n=3)
    flight = await admit(gw, key["key"], 100_000_000)
    for anchor, reset_at in [
        ("2025-06-20T06:00:00Z", "2026-01-20T06:00:00Z"),  # sooner than Feb 1
        ("2026-01-10T00:00:00Z", "2026-02-10T00:00:00Z"),  # later
    ]:
        r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"budget_anchor": anchor})
        assert r.status_code == 200, r.text
        out = r.json()
        assert (out["spend"], out["reserved"], out["reset_at"]) == (0.3, 0.1, reset_at)
        assert out["period_start"] == key["period_start"]
    await settle(gw, flight.info, Outcome("ok", 50_000_000, "prices", 1, 50, 200))
    state = await get_key(gw, key["id"])
    assert (state["spend"], state["reserved"]) == (0.35, 0.0)
    assert len(await periods(gw, key["id"])) == 1
    await assert_reconciled(gw)


# -- 5. lifetime budget ----------------------------------------------------------------------


async def test_lifetime_budget_never_resets(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="forever", max_budget=0.3)
    assert key["reset_at"] is None and key["budget_duration"] is None
    await spend_to_limit(gw, key, n=3)
    r = await gw.chat(key["key"], max_tokens=100)
    assert_budget_exceeded(r, key, spend="0.3", max_budget="0.3", reset_at=None, now=gw.clock.now())

    for years in (1, 5):
        gw.clock.set(utc(2026 + years, 1, 15, 12))
        assert await run_maintenance(gw.state.budgets) == (0, 0)
        r = await gw.chat(key["key"], max_tokens=1)
        assert_budget_exceeded(
            r, key, spend="0.3", max_budget="0.3", reset_at=None, now=gw.clock.now()
        )

    state = await get_key(gw, key["id"])
    assert state["reset_at"] is None and state["spend"] == pytest.approx(0.3)
    history = await periods(gw, key["id"])
    assert len(history) == 1
    assert history[0]["period_end"] is None and history[0]["closed_at"] is None

    # Only raising the limit lets requests through again.
    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0.4})
    assert r.status_code == 200, r.text
    r = await gw.chat(key["key"], max_tokens=100)
    assert r.status_code == 200, r.text
    assert "x-budget-reset-at" not in r.headers and "retry-after" not in r.headers
    assert money(r.headers["x-budget-remaining"]) == 0
    await assert_reconciled(gw)


# -- 7. timezones ----------------------------------------------------------------------------


async def test_daily_budget_resets_at_local_midnight(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(
        alias="berlin", max_budget=0.2, budget_duration="1d", budget_timezone="Europe/Berlin"
    )
    # 2026-01-15 12:00Z is 13:00 in Berlin (CET, UTC+1): the day runs 23:00Z to 23:00Z.
    assert key["period_start"] == "2026-01-14T23:00:00Z"
    assert key["reset_at"] == "2026-01-15T23:00:00Z"
    await spend_to_limit(gw, key, n=2)
    r = await gw.chat(key["key"], max_tokens=100)
    assert_budget_exceeded(
        r, key, spend="0.2", max_budget="0.2", reset_at="2026-01-15T23:00:00Z", now=gw.clock.now()
    )
    assert r.headers["retry-after"] == str(11 * 3600)

    gw.clock.set(utc(2026, 1, 15, 22, 59, 59))  # still the same local day
    assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429
    gw.clock.set(utc(2026, 1, 15, 23))  # local midnight
    r = await gw.chat(key["key"], max_tokens=100)
    assert r.status_code == 200, r.text
    assert r.headers["x-budget-reset-at"] == "2026-01-16T23:00:00Z"

    # Across the spring DST change (2026-03-29, 02:00 -> 03:00 local) the local day is 23 h.
    gw.clock.set(utc(2026, 3, 29, 10))
    assert await run_maintenance(gw.state.budgets) == (1, 0)
    state = await get_key(gw, key["id"])
    assert state["period_start"] == "2026-03-28T23:00:00Z"
    assert state["reset_at"] == "2026-03-29T22:00:00Z"  # CEST, UTC+2

    history = await periods(gw, key["id"])
    assert [(p["period_start"], p["period_end"]) for p in history] == [
        ("2026-01-14T23:00:00Z", "2026-01-15T23:00:00Z"),
        ("2026-01-15T23:00:00Z", "2026-01-16T23:00:00Z"),
        ("2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z"),
    ]
    await assert_reconciled(gw)


async def test_resending_the_unchanged_schedule_keeps_the_period(gateway: Gateway) -> None:
    """A PATCH that re-sends the current settings (as a 'save' form does) is no schedule
    change. The default anchor is the start of the unit containing the *creation* time:
    re-deriving it as of the PATCH would move it (1d, 30d, 1mo in a later month), open a new
    period and wipe the spend, a way around the budget."""
    gw = gateway
    cases = [  # duration, when the spend and the PATCH happen
        ("1mo", utc(2026, 1, 17, 9)),  # same period
        ("1d", utc(2026, 1, 18, 9)),  # a later day
        ("30d", utc(2026, 1, 20, 9)),  # same 30-day period, anchored on Jan 15
        ("1mo", utc(2026, 3, 6, 9)),  # a later month
    ]
    keys = [
        await gw.create_key(alias=f"resent-{i}", max_budget=1.0, budget_duration=duration)
        for i, (duration, _) in enumerate(cases)
    ]
    for key, (duration, moment) in zip(keys, cases, strict=True):
        gw.clock.set(moment)
        await spend_to_limit(gw, key)
        before = await get_key(gw, key["id"])
        body = {"max_budget": 1.0, "budget_duration": duration, "budget_timezone": "UTC"}
        r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["spend"] == 1.0, (duration, moment)
        assert (out["period_start"], out["reset_at"]) == (
            before["period_start"],
            before["reset_at"],
        )
        assert (await gw.chat(key["key"], max_tokens=1)).status_code == 429
        history = await periods(gw, key["id"])
        assert "schedule_change" not in [p["close_reason"] for p in history], history
        assert history[-1]["closed_at"] is None and history[-1]["spend"] == 1.0
    await assert_reconciled(gw)


async def test_budget_views_show_the_new_period_once_the_boundary_passed(
    gateway: Gateway,
) -> None:
    """No request and no scheduler pass yet: a client checking itself (GET /v1/budget) and the
    admin must not be told the key is exhausted until a reset time that has already passed.
    One key per view, so that each view is the first to look after the boundary."""
    gw = gateway
    views = ["client", "admin-get", "admin-list", "admin-periods"]
    keys = {
        view: await gw.create_key(alias=f"viewer-{view}", max_budget=1.0, budget_duration="1mo")
        for view in views
    }
    for key in keys.values():
        await spend_to_limit(gw, key)
    gw.clock.set(utc(2026, 2, 2, 8))

    for view, key in keys.items():
        if view == "client":
            headers = {"authorization": f"Bearer {key['key']}"}
            r = await gw.client.get("/v1/budget", headers=headers)
            assert r.status_code == 200, r.text
            (shown,) = r.json()["budgets"]
        elif view == "admin-get":
            shown = await get_key(gw, key["id"])
        elif view == "admin-list":
            r = await gw.admin("GET", "/admin/keys", params={"alias": key["alias"]})
            assert r.status_code == 200, r.text
            (shown,) = r.json()["data"]
        else:
            history = await periods(gw, key["id"])
            assert [(p["period_start"], p["spend"], p["close_reason"]) for p in history] == [
                ("2026-01-01T00:00:00Z", 1.0, "expired"),
                ("2026-02-01T00:00:00Z", 0.0, None),
            ]
            shown = {**history[-1], "reset_at": history[-1]["period_end"], "remaining": 1.0}
        assert shown["spend"] == 0.0 and shown["remaining"] == 1.0, view
        assert shown["period_start"] == "2026-02-01T00:00:00Z", view
        assert shown["reset_at"] == "2026-03-01T00:00:00Z", view
    await assert_reconciled(gw)


async def test_settings_changed_after_the_boundary_leave_the_closed_period_alone(
    gateway: Gateway,
) -> None:
    """A closed period keeps the limit it was held to, even when the change lands before
    anything rolled it; and a manual reset then resets the new period, not the old one."""
    gw = gateway
    key = await gw.create_key(alias="late-patch", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key)
    gw.clock.set(utc(2026, 2, 2, 8))

    r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0.5})
    assert r.status_code == 200, r.text
    assert r.json()["spend"] == 0.0 and r.json()["remaining"] == 0.5
    r = await gw.admin("POST", f"/admin/keys/{key['id']}/reset")
    assert r.status_code == 200, r.text
    assert r.json()["reset_at"] == "2026-03-01T00:00:00Z"

    history = await periods(gw, key["id"])
    assert [
        (p["period_start"], p["max_budget"], p["spend"], p["close_reason"]) for p in history
    ] == [
        ("2026-01-01T00:00:00Z", 1.0, 1.0, "expired"),
        ("2026-02-01T00:00:00Z", 0.5, 0.0, "manual"),
        ("2026-02-02T08:00:00Z", 0.5, 0.0, None),
    ]
    await assert_reconciled(gw)


async def test_racing_resets_open_exactly_one_period(gateway: Gateway) -> None:
    """Requests and two schedulers (replicas) all cross the boundary at once."""
    gw = gateway
    key = await gw.create_key(alias="racer", max_budget=1.0, budget_duration="1mo")
    await spend_to_limit(gw, key)
    gw.clock.set(utc(2026, 2, 1, 0, 0, 1))
    other_replica = type(gw.state.budgets)(gw.state.engine, gw.clock, 900)

    results = await asyncio.gather(
        *(gw.chat(key["key"], max_tokens=10) for _ in range(12)),
        run_maintenance(gw.state.budgets),
        run_maintenance(other_replica),
    )
    responses = results[:12]
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses]
    history = await periods(gw, key["id"])
    assert [(p["period_start"], p["close_reason"]) for p in history] == [
        ("2026-01-01T00:00:00Z", "expired"),
        ("2026-02-01T00:00:00Z", None),
    ]
    assert history[0]["spend"] == 1.0
    assert history[1]["spend"] == pytest.approx(0.12)
    await assert_reconciled(gw)

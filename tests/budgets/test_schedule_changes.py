"""Schedule changes within a period (SPEC 5): whatever sequence of duration, timezone and anchor
changes is made while a period is open, that period stays the one open period, keeps its start
and its spend, and ends at the latest schedule's next boundary; so the changes never let the key
spend more than its max_budget in it. Property-based, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from app.budgets.schedule import Schedule
from app.ledger.contract import Outcome
from tests.budgets.helpers import admit, assert_reconciled, periods, settle, when
from tests.conftest import START, Gateway
from tests.hostile.test_proxy_bodies import run_hypothesis

MAX = 1_000_000_000  # $1
ATTEMPT = 400_000_000  # each request tries to spend $0.40: two fit in a period, not three

DURATIONS = st.sampled_from([None, "1h", "1d", "7d", "1w", "30d", "1mo", "3mo", "1y"])
ZONES = st.sampled_from(
    ["UTC", "America/New_York", "Pacific/Kiritimati", "Pacific/Pago_Pago", "Asia/Kathmandu"]
)
ANCHORS = st.none() | st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2026, 6, 1), timezones=st.just(UTC)
)
CHANGES = st.fixed_dictionaries(
    {},
    optional={"budget_duration": DURATIONS, "budget_timezone": ZONES, "budget_anchor": ANCHORS},
).filter(bool)
# (seconds until the change, but never past the open period's end; the change)
STEPS = st.lists(st.tuples(st.integers(0, 40 * 86400), CHANGES), min_size=1, max_size=6)


def settings_of(key: dict[str, Any]) -> tuple[str | None, str, datetime | None]:
    anchor = key["budget_anchor"]
    return key["budget_duration"], key["budget_timezone"], anchor and when(anchor)


async def test_schedule_changes_keep_the_open_period_and_its_spend(gateway: Gateway) -> None:
    gw = gateway

    async def try_to_spend(key: dict[str, Any]) -> int:
        flight = await admit(gw, key["key"], ATTEMPT)
        if not flight.admitted:
            return 0
        assert await settle(gw, flight.info, Outcome("ok", ATTEMPT, "prices", 1, 1, 200))
        return ATTEMPT

    async def check(example: tuple[str | None, str, list[tuple[int, dict[str, Any]]]]) -> None:
        duration, zone, steps = example
        gw.clock.set(START)
        key = await gw.create_key(max_budget=1.0, budget_duration=duration, budget_timezone=zone)
        start = key["period_start"]
        spent = await try_to_spend(key)
        for later, change in steps:
            target = gw.clock.now() + timedelta(seconds=later)
            if key["reset_at"] is not None:  # changes made while the period is open
                target = min(target, when(key["reset_at"]) - timedelta(seconds=1))
            gw.clock.set(max(target, gw.clock.now()))
            body = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in change.items()}
            r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json=body)
            assert r.status_code == 200, (body, r.text)
            changed = r.json()
            now = gw.clock.now()
            if settings_of(changed) == settings_of(key):  # nothing changed: nothing moves
                expected_end = key["reset_at"] and when(key["reset_at"])
            else:
                expected_end = Schedule.create(*settings_of(changed), now).current_end(now)
            assert (changed["reset_at"] and when(changed["reset_at"])) == expected_end, body
            assert expected_end is None or expected_end > now
            assert changed["period_start"] == start, body
            assert round(changed["spend"] * 1e9) == spent, body
            key = {**key, **changed}
            spent += await try_to_spend(key)
        assert spent <= MAX
        [period] = await periods(gw, key["id"])
        assert period["closed_at"] is None and round(period["spend"] * 1e9) == spent

    await run_hypothesis(st.tuples(DURATIONS, ZONES, STEPS), check, max_examples=40)
    await assert_reconciled(gw)

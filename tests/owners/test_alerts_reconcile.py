"""Budgets of owners other than keys in the alerts pass (SPEC 8, 12: events name the owner,
amounts in the budget's unit), in reconcile (every budget counted; a retired one has no open
period) and in the opt-in metrics gauges."""

from __future__ import annotations

from sqlalchemy import text

from app.budgets.state import PeriodState
from app.clock import ManualClock
from app.ledger import repository as ledger
from app.ledger.contract import KeyContext
from app.scheduler import run_alerts
from tests.alerts.helpers import Receiver, alerts
from tests.conftest import START, Gateway, make_settings, running_gateway
from tests.servers import ServerThread

NANO = 1_000_000_000


async def _sql(gw: Gateway, sql: str, **params: object) -> list:
    async with gw.state.engine.begin() as conn:
        result = await conn.execute(text(sql), params)
        return list(result.all()) if result.returns_rows else []


async def _open_period(gw: Gateway, owner_id: str, unit: str) -> tuple[str, int]:
    ((budget_id, period_id),) = await _sql(
        gw,
        "SELECT b.id, p.id FROM budgets b JOIN budget_periods p ON p.budget_id = b.id "
        "WHERE b.owner_id = :o AND b.unit = :u AND p.closed_at IS NULL",
        o=owner_id,
        u=unit,
    )
    return budget_id, int(period_id)


async def test_a_team_budget_alerts_naming_the_team(gw: Gateway, receiver: Receiver) -> None:
    r = await gw.admin(
        "POST",
        "/admin/teams",
        json={
            "alias": "research",
            "max_budget": 1,
            "soft_budget": 0.5,
            "alert_at": [0.8],
            "budget_duration": "1d",
            "budgets": [{"max_budget": 1000, "unit": "tokens", "alert_at": [0.5]}],
        },
    )
    assert r.status_code == 201, r.text
    team = r.json()
    _, usd_period = await _open_period(gw, team["id"], "usd")
    _, tokens_period = await _open_period(gw, team["id"], "tokens")
    await _sql(
        gw, "UPDATE budget_periods SET spend = :s WHERE id = :p", s=NANO * 9 // 10, p=usd_period
    )
    await _sql(gw, "UPDATE budget_periods SET spend = 600 WHERE id = :p", p=tokens_period)

    assert await run_alerts(alerts(gw)) == (3, 3)
    assert await run_alerts(alerts(gw)) == (0, 0)  # once per period
    (soft,) = receiver.of("soft_budget_crossed")
    assert (soft["scope"], soft["owner_id"], soft["owner_name"]) == ("team", team["id"], "research")
    assert soft["key_id"] is None and soft["unit"] == "usd"
    assert soft["spend"] == 0.9 and soft["soft_budget"] == 0.5 and soft["max_budget"] == 1.0
    thresholds = {e["unit"]: e for e in receiver.of("threshold")}
    assert thresholds["usd"]["threshold"] == 0.8 and thresholds["usd"]["owner_name"] == "research"
    assert thresholds["tokens"]["spend"] == 600 and thresholds["tokens"]["max_budget"] == 1000

    # Exhausted: the request path reports the refusing period with its key; the event names
    # the budget's owner.
    key = await gw.create_key(alias="k", team_id=team["id"])
    ctx = KeyContext(key["id"], "k", key["key_prefix"], "active", [], None, [], None)
    state = PeriodState(
        (await _open_period(gw, team["id"], "usd"))[0], usd_period, START, None, NANO, NANO, 0
    )
    alerts(gw).exhausted_soon(ctx, state)
    await alerts(gw).recorded_in_background()
    (exhausted,) = receiver.of("exhausted")
    assert exhausted["scope"] == "team" and exhausted["owner_name"] == "research"


async def test_reconcile_counts_every_owner_and_retired_budgets(gw: Gateway) -> None:
    team = (
        await gw.admin(
            "POST", "/admin/teams", json={"alias": "t", "max_budget": 5, "max_parallel_requests": 2}
        )
    ).json()
    tag = (await gw.admin("POST", "/admin/tags", json={"name": "x", "max_budget": 1})).json()
    await gw.admin("PATCH", f"/admin/teams/{team['id']}", json={"max_parallel_requests": None})
    await gw.admin("POST", f"/admin/tags/{tag['id']}/reset")
    assert (await gw.admin("DELETE", f"/admin/tags/{tag['id']}")).status_code == 200
    key = await gw.create_key(alias="k")

    # A charge to the team's period, as settlement writes it.
    _, period = await _open_period(gw, team["id"], "usd")
    await _sql(
        gw,
        "INSERT INTO ledger_entries (request_id, key_id, team_id, endpoint, stream, cost, "
        "overrun, cost_source, outcome, started_at, finished_at) "
        "VALUES ('r1', :k, :t, '/v1/chat/completions', false, :c, 0, 'prices', 'ok', :s, :s)",
        k=key["id"],
        t=team["id"],
        c=NANO // 100,
        s=START,
    )
    await _sql(gw, "INSERT INTO ledger_charges VALUES ('r1', :p, :c)", p=period, c=NANO // 100)
    await _sql(gw, "UPDATE budget_periods SET spend = :c WHERE id = :p", c=NANO // 100, p=period)

    report = await ledger.reconcile(gw.state.engine)
    assert report.ok, report.problems
    # team primary + its retired parallel budget, tag primary (reset: 2 periods), key primary
    assert report.periods_checked == 5 and report.entries_checked == 1

    # A retired budget with an open period is a problem.
    await _sql(
        gw,
        "UPDATE budget_periods SET closed_at = NULL WHERE id = "
        "(SELECT max(p.id) FROM budget_periods p JOIN budgets b ON b.id = p.budget_id "
        "WHERE b.owner_id = :o)",
        o=tag["id"],
    )
    report = await ledger.reconcile(gw.state.engine)
    assert len(report.problems) == 1 and "it is retired" in report.problems[0]


async def test_budget_gauges_label_the_owner(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(database_url, mock_upstream.url, metrics_budget_gauges=True)
    async with running_gateway(settings, clock) as gw:
        r = await gw.admin(
            "POST",
            "/admin/teams",
            json={
                "alias": "ops",
                "max_budget": 2,
                "budgets": [{"max_budget": 9, "unit": "tokens"}],
            },
        )
        team = r.json()
        page = (await gw.client.get("/metrics")).text
        (line,) = [
            x for x in page.splitlines() if x.startswith("budgetgate_budget_remaining_dollars{")
        ]  # the dollar budget only: a tokens budget is not in dollars
        assert f'owner_id="{team["id"]}"' in line and 'owner_name="ops"' in line
        assert 'scope="team"' in line and line.endswith(" 2.0")
        await gw.admin("DELETE", f"/admin/teams/{team['id']}")
        assert team["id"] not in (await gw.client.get("/metrics")).text

"""`reconcile` (SPEC 6): clean after real traffic and resets, and a clear, named problem for
every kind of hand-made damage; the `budgetgate reconcile` command's exit code."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.clock import ManualClock
from app.config import get_settings
from app.ledger.repository import reconcile
from app.scheduler import run_maintenance
from tests.budgets.helpers import chat_billed, spend_to_limit
from tests.conftest import START, Gateway, make_settings, running_gateway
from tests.servers import ServerThread


async def _traffic(gw: Gateway) -> dict:
    """A month of spend to the limit, a reset, some more spend, a manual reset."""
    key = await gw.create_key(alias="audited", max_budget=0.5, budget_duration="1mo")
    await spend_to_limit(gw, key, n=5)
    assert (await gw.chat(key["key"], max_tokens=100)).status_code == 429
    gw.clock.advance(timedelta(days=20))
    assert await run_maintenance(gw.state.budgets) == (1, 0)
    await spend_to_limit(gw, key, n=2)
    r = await gw.admin("POST", f"/admin/keys/{key['id']}/reset")
    assert r.status_code == 200, r.text
    await spend_to_limit(gw, key, n=1)
    return key


async def _period_ids(gw: Gateway, key_id: str) -> list[int]:
    """The key's primary-budget period ids, oldest first; the last one is open."""
    async with gw.state.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT p.id FROM budget_periods p JOIN budgets b ON b.id = p.budget_id "
                "WHERE b.key_id = :k ORDER BY p.period_start, p.id"
            ),
            {"k": key_id},
        )
        return [int(r[0]) for r in rows]


async def _execute(gw: Gateway, sql: str, **params: object) -> None:
    async with gw.state.engine.begin() as conn:
        await conn.execute(text(sql), params)


async def test_reconcile_is_clean_after_traffic_and_names_each_damage(gateway: Gateway) -> None:
    gw = gateway
    key = await _traffic(gw)
    report = await reconcile(gw.state.engine)
    assert report.ok, report.problems
    assert report.periods_checked == 3
    assert report.entries_checked == 9  # 8 admitted + 1 rejected
    first, second, current = await _period_ids(gw, key["id"])

    async def damaged(do: str, undo: str, **params: object) -> list[str]:
        """Apply a hand-made change, return what reconcile says, then put it back."""
        await _execute(gw, do, **params)
        problems = (await reconcile(gw.state.engine)).problems
        await _execute(gw, undo, **params)
        assert (await reconcile(gw.state.engine)).ok
        return problems

    # A period's spend altered by hand: one problem, naming the period.
    problems = await damaged(
        "UPDATE budget_periods SET spend = spend + 1 WHERE id = :id",
        "UPDATE budget_periods SET spend = spend - 1 WHERE id = :id",
        id=first,
    )
    assert len(problems) == 1, problems
    assert f"period {first}" in problems[0] and "spend" in problems[0], problems

    # A reserved amount that no open reservation explains.
    problems = await damaged(
        "UPDATE budget_periods SET reserved = reserved + 7 WHERE id = :id",
        "UPDATE budget_periods SET reserved = reserved - 7 WHERE id = :id",
        id=current,
    )
    assert len(problems) == 1, problems
    assert f"period {current}" in problems[0] and "reserved" in problems[0], problems

    # A budget left without an open period.
    problems = await damaged(
        "UPDATE budget_periods SET closed_at = period_start, close_reason = 'manual' "
        "WHERE id = :id",
        "UPDATE budget_periods SET closed_at = NULL, close_reason = NULL WHERE id = :id",
        id=current,
    )
    assert any("0 open periods" in p for p in problems), problems

    # One entry charged to two periods of the same budget.
    async with gw.state.engine.connect() as conn:
        charge = (
            await conn.execute(
                text(
                    "SELECT request_id, amount FROM ledger_charges WHERE period_id = :p "
                    "ORDER BY request_id LIMIT 1"
                ),
                {"p": first},
            )
        ).one()
        await conn.rollback()
    problems = await damaged(
        "INSERT INTO ledger_charges (request_id, period_id, amount) VALUES (:r, :p, :a)",
        "DELETE FROM ledger_charges WHERE request_id = :r AND period_id = :p AND amount = :a",
        r=charge.request_id,
        p=second,
        a=charge.amount,
    )
    assert any(charge.request_id in p and "2 times" in p for p in problems), problems


# -- the command -----------------------------------------------------------------------------


def _run_cli(database_url: str, *args: str) -> tuple[int, str]:
    """`budgetgate reconcile` in-process (Typer's runner), with only our database URL set."""
    env = {k: None for k in os.environ if k.startswith("BUDGETGATE_")}
    env["BUDGETGATE_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, ["reconcile", *args], env=env)
    finally:
        get_settings.cache_clear()  # leave no test settings behind
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result.exit_code, result.output


async def test_cli_reconcile_exit_code(
    sqlite_url: str, mock_upstream: ServerThread, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    async with running_gateway(
        make_settings(sqlite_url, mock_upstream.url), ManualClock(START)
    ) as gw:
        key = await _traffic(gw)
        period_id = (await _period_ids(gw, key["id"]))[0]
        over, request_id = await _overrun_key(gw)  # listed, not a problem

    code, out = await asyncio.to_thread(_run_cli, sqlite_url)
    assert code == 0, out
    assert "ledger is consistent" in out
    assert "PROBLEM" not in out
    assert f"OVERRUN: request {request_id} (key {over['id']}" in out, out
    assert "reserved $0.010000000, cost $0.050000000, overrun $0.040000000" in out, out
    code, out = await asyncio.to_thread(_run_cli, sqlite_url, "--json")
    assert code == 0, out
    report = orjson.loads(out)
    assert report["ok"] is True and report["problems"] == []
    assert report["periods_checked"] == 4 and report["entries_checked"] == 11
    [overrun] = report["overruns"]
    assert (overrun["request_id"], overrun["key_id"]) == (request_id, over["id"])
    assert (overrun["reservation"], overrun["cost"], overrun["overrun"]) == (0.01, 0.05, 0.04)

    db_file = sqlite_url.split("///", 1)[1]
    with sqlite3.connect(db_file) as db:
        db.execute("UPDATE budget_periods SET spend = spend + 1 WHERE id = ?", (period_id,))
    db.close()
    code, out = await asyncio.to_thread(_run_cli, sqlite_url)
    assert code == 1, out
    assert f"PROBLEM: period {period_id}" in out, out
    assert "1 problem(s) found" in out, out
    code, out = await asyncio.to_thread(_run_cli, sqlite_url, "--json")
    assert code == 1, out
    report = orjson.loads(out)
    assert report["ok"] is False
    assert len(report["problems"]) == 1 and f"period {period_id}" in report["problems"][0]


# -- spend against the limit (SPEC 6, 10) ------------------------------------------------------


async def _overrun_key(gw: Gateway) -> tuple[dict, str]:
    """A key whose period went over its $0.03 limit through one recorded overrun: $0.01
    reserved, $0.05 billed. Returns the key and the overrun's request id."""
    key = await gw.create_key(alias="over", max_budget=0.03, budget_duration="1mo")
    assert (await gw.chat(key["key"], max_tokens=10)).status_code == 200  # $0.01, no overrun
    r = await chat_billed(gw, key, "0.05")
    assert r.status_code == 200, r.text
    return key, r.headers["x-request-id"]


async def test_a_period_over_its_limit_is_explained_by_its_overruns_or_broken(
    gateway: Gateway,
) -> None:
    gw = gateway
    key, request_id = await _overrun_key(gw)
    (period_id,) = await _period_ids(gw, key["id"])
    report = await reconcile(gw.state.engine)
    assert report.ok, report.problems  # $0.06 spent = $0.03 + the $0.04 overrun, less
    [overrun] = report.overruns
    assert (overrun.request_id, overrun.key_id) == (request_id, key["id"])
    assert (overrun.reservation, overrun.cost, overrun.overrun) == (10**7, 5 * 10**7, 4 * 10**7)

    # The same spend without the overrun recorded: broken, naming the period.
    await _execute(gw, "UPDATE ledger_entries SET overrun = 0 WHERE request_id = :r", r=request_id)
    report = await reconcile(gw.state.engine)
    assert report.overruns == []
    assert len(report.problems) == 1, report.problems
    assert f"period {period_id}" in report.problems[0], report.problems
    assert "max_budget" in report.problems[0], report.problems

    # An overrun smaller than the excess does not explain it either ($0.06 > $0.03 + $0.02).
    await _execute(
        gw, "UPDATE ledger_entries SET overrun = 20000000 WHERE request_id = :r", r=request_id
    )
    assert len((await reconcile(gw.state.engine)).problems) == 1
    await _execute(
        gw, "UPDATE ledger_entries SET overrun = 30000000 WHERE request_id = :r", r=request_id
    )
    assert (await reconcile(gw.state.engine)).ok


async def test_a_limit_lowered_under_the_spend_is_no_broken_invariant(gateway: Gateway) -> None:
    """Freezing a key (max_budget 0) after it spent: the period was held to its higher limit
    while it admitted; a later, higher limit does not lower that."""
    gw = gateway
    key = await gw.create_key(max_budget=1, budget_duration="1mo")
    await spend_to_limit(gw, key, n=3, tokens=100)  # $0.03
    for limit in (0, 0.5):
        r = await gw.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": limit})
        assert r.status_code == 200, r.text
    report = await reconcile(gw.state.engine)
    assert report.ok, report.problems
    # It is the limit it admitted under that counts: forced over it, the period is reported.
    (period_id,) = await _period_ids(gw, key["id"])
    await _execute(
        gw, "UPDATE budget_periods SET peak_max_budget = 20000000 WHERE id = :i", i=period_id
    )
    assert [p for p in (await reconcile(gw.state.engine)).problems if "max_budget" in p]

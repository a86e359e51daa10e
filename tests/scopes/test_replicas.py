"""Scopes across replicas (SPEC 11): three real `budgetgate serve` processes on one PostgreSQL,
requests spread over them. A team budget and a parallel-request limit are exact, because they
live in the one ledger every replica admits against."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.clock import SystemClock
from app.ledger.periods import BudgetRepository
from tests.pgcluster import PgCluster, find_pg_bindir
from tests.procs import Fleet, auth, chat_body
from tests.scopes.helpers import NANOS, budget, join, owner, periods_of

pytestmark = [
    pytest.mark.process,
    pytest.mark.postgres,
    pytest.mark.skipif(find_pg_bindir() is None, reason="no PostgreSQL server binaries installed"),
]


@pytest.fixture(scope="module")
def fleet(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    url = pg_cluster.create_database("scopes_fleet")
    with Fleet(tmp_path_factory.mktemp("scopes-fleet"), url, replicas=3) as f:
        yield f


@pytest.fixture
async def ledger(fleet: Fleet) -> AsyncIterator[Any]:
    """The fleet's ledger, as the scope helpers write owners and budgets into it."""
    engine = create_async_engine(fleet.database_url)
    clock = SystemClock()
    yield SimpleNamespace(
        clock=clock,
        state=SimpleNamespace(engine=engine, budgets=BudgetRepository(engine, clock, 60)),
    )
    await engine.dispose()


async def send(
    client: httpx.AsyncClient, fleet: Fleet, i: int, key: str, **headers: str
) -> httpx.Response:
    url = fleet.urls[i % 3] + "/v1/chat/completions"
    return await client.post(url, json=chat_body(), headers=auth(key, **headers))


async def test_a_team_budget_is_exact_across_replicas(fleet: Fleet, ledger: Any) -> None:
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        keys = [
            await fleet.create_key(client, replica=i % 3, alias=f"t{i}", max_budget=10)
            for i in range(10)
        ]
        team = await owner(ledger, "team", "replicated")
        for key in keys:
            await join(ledger, key["id"], team)
        team_budget = await budget(ledger, "team", team, 0.37, duration="1mo", kind="primary")
        results = await asyncio.gather(
            *(send(client, fleet, i, keys[i % 10]["key"]) for i in range(200))
        )
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == 37 and statuses.count(429) == 163, statuses
    [period] = await periods_of(ledger, team_budget)
    assert (period["spend"], period["reserved"]) == (37 * NANOS // 100, 0)
    done = fleet.reconcile()
    assert done.returncode == 0, done.stdout + done.stderr


async def test_a_parallel_limit_is_exact_across_replicas(fleet: Fleet, ledger: Any) -> None:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
        key = await fleet.create_key(client, alias="p", max_budget=10)
        await budget(ledger, "key", key["id"], 5, unit="parallel", kind="parallel")
        await fleet.mock_reset(client)
        results = await asyncio.gather(
            *(send(client, fleet, i, key["key"], **{"x-mock-delay-ms": "300"}) for i in range(40))
        )
        stats = (await client.get(fleet.mock.url + "/mock/stats")).json()
    statuses = [r.status_code for r in results]
    assert 5 <= statuses.count(200) and statuses.count(200) + statuses.count(429) == 40
    assert stats["most_in_flight"] <= 5, stats
    assert all(
        r.json()["error"]["code"] == "parallel_limit_exceeded"
        for r in results
        if r.status_code == 429
    )
    done = fleet.reconcile()
    assert done.returncode == 0, done.stdout + done.stderr


async def test_an_end_user_budget_is_exact_across_replicas_from_its_first_sight(
    fleet: Fleet, ledger: Any
) -> None:
    """200 requests of one new end user, from ten keys of its team, spread over three replicas
    at once: one end user is created (one open period per template budget), and its budget
    admits exactly what fits."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        template = [{"max_budget": 0.37, "budget_duration": "1mo"}]
        r = await fleet.admin(
            client, "POST", "/admin/teams", json={"alias": "eu", "end_user_budget": template}
        )
        assert r.status_code == 201, r.text
        team = r.json()
        keys = [
            await fleet.create_key(client, replica=i % 3, alias=f"e{i}", team_id=team["id"])
            for i in range(10)
        ]
        results = await asyncio.gather(
            *(
                send(client, fleet, i, keys[i % 10]["key"], **{"x-budget-end-user": "cust-1"})
                for i in range(200)
            )
        )
        listed = await fleet.admin(
            client, "GET", "/admin/end-users", params={"team_id": team["id"]}
        )
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == 37 and statuses.count(429) == 163, statuses
    [end_user] = listed.json()["data"]
    assert (end_user["user"], end_user["spend"], end_user["reserved"]) == ("cust-1", 0.37, 0)
    async with ledger.state.engine.connect() as conn:
        open_periods = await conn.execute(
            text(
                "SELECT count(*) FROM budget_periods p JOIN budgets b ON b.id = p.budget_id "
                "WHERE b.owner_id = :o AND p.closed_at IS NULL"
            ),
            {"o": end_user["id"]},
        )
        assert open_periods.scalar_one() == 1
    done = fleet.reconcile()
    assert done.returncode == 0, done.stdout + done.stderr

"""End users on first sight (SPEC 11): ensure_end_user creates one row and the template's
budgets, each with one open period, however many first requests race on however many
processes (engines); later calls find it."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from app.clock import ManualClock
from app.db import create_engine
from app.ledger import repository as ledger
from app.owners.end_users import ensure_end_user
from tests.conftest import START, Gateway, make_settings


async def _team_key(gw: Gateway, template: list[dict] | None) -> tuple[dict, dict]:
    r = await gw.admin("POST", "/admin/teams", json={"alias": "t", "end_user_budget": template})
    assert r.status_code == 201, r.text
    team = r.json()
    return team, await gw.create_key(alias="k", team_id=team["id"])


async def test_first_sight_applies_the_team_template(gateway: Gateway) -> None:
    template = [
        {"max_budget": 100, "unit": "requests", "budget_duration": "1d"},
        {"max_budget": 0.5, "budget_duration": "1mo"},
    ]
    team, key = await _team_key(gateway, template)
    engine, clock = gateway.state.engine, gateway.clock
    end_user_id = await ensure_end_user(engine, clock, key["id"], "cust-1")
    assert end_user_id is not None
    assert await ensure_end_user(engine, clock, key["id"], "cust-1") == end_user_id

    out = (await gateway.admin("GET", f"/admin/end-users/{end_user_id}")).json()
    assert out["team_id"] == team["id"] and out["user"] == "cust-1"
    # The first dollar budget on every model is the flat one; the rest are windows.
    assert out["max_budget"] == 0.5 and out["reset_at"] == "2026-02-01T00:00:00Z"
    (window,) = out["budgets"]
    assert window["unit"] == "requests" and window["max_budget"] == 100

    # A template changed later applies to end users seen later, not to this one.
    await gateway.admin("PATCH", f"/admin/teams/{team['id']}", json={"end_user_budget": []})
    later = await ensure_end_user(engine, clock, key["id"], "cust-2")
    assert (await gateway.admin("GET", f"/admin/end-users/{later}")).json()["max_budget"] is None
    assert (await gateway.admin("GET", f"/admin/end-users/{end_user_id}")).json()["max_budget"]


async def test_without_a_team_the_key_is_the_scope_and_its_template_applies(
    gateway: Gateway,
) -> None:
    key = await gateway.create_key(alias="k", end_user_budget=[{"max_budget": 2}])
    end_user_id = await ensure_end_user(gateway.state.engine, gateway.clock, key["id"], "c")
    out = (await gateway.admin("GET", f"/admin/end-users/{end_user_id}")).json()
    assert (out["key_id"], out["team_id"], out["max_budget"]) == (key["id"], None, 2.0)
    assert out["reset_at"] is None  # a lifetime budget

    bare = await gateway.create_key(alias="bare")
    plain = await ensure_end_user(gateway.state.engine, gateway.clock, bare["id"], "c")
    assert plain is not None and plain != end_user_id  # same name, another scope
    out = (await gateway.admin("GET", f"/admin/end-users/{plain}")).json()
    assert out["max_budget"] is None and out["budgets"] is None
    assert await ensure_end_user(gateway.state.engine, gateway.clock, "key_nope", "c") is None


async def test_concurrent_first_sight_on_several_processes_makes_one_end_user(
    postgres_url: str, mock_upstream: object
) -> None:
    from tests.conftest import running_gateway

    clock = ManualClock(START)
    settings = make_settings(postgres_url, mock_upstream.url)  # type: ignore[attr-defined]
    async with running_gateway(settings, clock) as gw:
        template = [
            {"max_budget": 1, "budget_duration": "1d"},
            {"max_budget": 1000, "unit": "tokens"},
        ]
        _, key = await _team_key(gw, template)
        engines = [create_engine(settings) for _ in range(5)]
        try:
            ids = await asyncio.gather(
                *(ensure_end_user(engines[i % 5], clock, key["id"], "racer") for i in range(50))
            )
        finally:
            for engine in engines:
                await engine.dispose()
        assert len(set(ids)) == 1 and ids[0] is not None
        async with gw.state.engine.connect() as conn:
            owners = (
                await conn.execute(text("SELECT count(*) FROM owners WHERE kind = 'end_user'"))
            ).scalar_one()
            open_periods = (
                await conn.execute(
                    text(
                        "SELECT b.id, count(p.id) FROM budgets b LEFT JOIN budget_periods p "
                        "ON p.budget_id = b.id AND p.closed_at IS NULL "
                        "WHERE b.owner_id = :id GROUP BY b.id"
                    ),
                    {"id": ids[0]},
                )
            ).all()
        assert owners == 1
        assert sorted(n for _, n in open_periods) == [1, 1]  # two budgets, one open period each
        assert (await ledger.reconcile(gw.state.engine)).ok


async def test_the_unique_name_decides_between_two_open_transactions(postgres_url: str) -> None:
    """The primitive under ensure_end_user: a second insert of the same (kind, scope, name),
    started while the first transaction is open, inserts nothing -- whether it reaches the
    database before the first commits (it then waits for it) or after."""
    from app.owners.repository import find_owner, insert_owner_if_new

    settings = make_settings(postgres_url, "http://upstream.invalid")
    first, second = create_engine(settings), create_engine(settings)

    def row(owner_id: str) -> dict:
        return {"id": owner_id, "kind": "end_user", "scope": "key:k", "name": "same",
                "metadata": {}, "created_at": START, "updated_at": START}  # fmt: skip

    async def insert_second() -> bool:
        async with second.begin() as conn:
            return await insert_owner_if_new(conn, row("eu_second"))

    try:
        async with first.begin() as conn:
            assert await insert_owner_if_new(conn, row("eu_first"))
            racing = asyncio.create_task(insert_second())
        assert await racing is False
        async with second.connect() as conn:
            found = await find_owner(conn, "end_user", "key:k", "same")
        assert found is not None and found.id == "eu_first"
    finally:
        await first.dispose()
        await second.dispose()

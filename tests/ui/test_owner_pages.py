"""Teams, users, end users and tags on the dashboard, in-process on SQLite and PostgreSQL: each
one's reader (its budgets in their units, its periods, its ledger entries and no one else's),
the overview's standings across every kind of owner (nearest to the limit first, deleted owners
and budgets in other units left out), the owners' list and page."""

from __future__ import annotations

from typing import Any

from app.ui import reads
from app.ui.owners import owner_readers
from tests.conftest import ADMIN_KEY, Gateway
from tests.ui.helpers import sign_in

CENT = 10_000_000  # nano-dollars: what one request of the mock upstream costs here


RESEARCH = {
    "alias": "research",
    "budgets": [{"max_budget": 1000, "unit": "tokens", "budget_duration": "1d"}],
    "end_user_budget": [{"max_budget": 1, "budget_duration": "1mo"}],
    "max_budget": 0.05,
    "budget_duration": "1mo",
}


async def create(gw: Gateway, path: str, **body: object) -> dict[str, Any]:
    r = await gw.admin("POST", f"/admin/{path}", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


async def spend(gw: Gateway, key: str, end_user: str | None, tags: str | None) -> None:
    headers = {"authorization": f"Bearer {key}"}
    if end_user is not None:
        headers["x-budget-end-user"] = end_user
    if tags is not None:
        headers["x-budget-tags"] = tags
    r = await gw.client.post(
        "/v1/chat/completions",
        json={
            "model": "bg-test",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
        },
        headers=headers,
    )
    assert r.status_code == 200, r.text


async def scene(gw: Gateway) -> dict[str, Any]:
    """A team (5 cents a month, and 1,000 tokens a day), a user, a tag (3 cents), a key in the
    team and of the user that spends 3 cents for end user cust-1 with the tag, and another key
    that spends 1 cent for no one."""
    team = await create(gw, "teams", **RESEARCH)
    user = await create(gw, "users", alias="ann", max_budget=1, budget_duration="1mo")
    tag = await create(gw, "tags", name="batch", max_budget=0.03, budget_duration="1mo")
    key = await gw.create_key(
        alias="in-team", max_budget=10, team_id=team["id"], user_id=user["id"]
    )
    other = await gw.create_key(alias="alone", max_budget=10)
    for _ in range(3):
        await spend(gw, key["key"], "cust-1", "batch")
    await spend(gw, other["key"], None, None)
    r = await gw.admin("GET", "/admin/end-users", params={"user": "cust-1"})
    (end_user,) = r.json()["data"]
    return {
        "team": team,
        "user": user,
        "tag": tag,
        "end_user": end_user,
        "key": key,
        "other": other,
    }


def readers(gw: Gateway) -> dict[str, Any]:
    return owner_readers(gw.state.key_service, gw.state.owner_service, gw.state.engine)


async def test_each_kind_of_owner_reads_its_budgets_periods_and_entries(gateway: Gateway) -> None:
    s = await scene(gateway)
    by_scope = readers(gateway)
    team = await by_scope["team"].owner(s["team"]["id"])
    assert (team.scope, team.label, team.status) == ("team", "research", "active")
    dollars, tokens = team.budgets
    assert (dollars.unit, dollars.spend, dollars.max_budget) == ("usd", 3 * CENT, 5 * CENT)
    assert (tokens.unit, tokens.window, tokens.max_budget) == ("tokens", "1d", 1000)
    entries = await by_scope["team"].entries(team, 25)
    assert len(entries) == 3 and {e.team_id for e in entries} == {s["team"]["id"]}
    assert tokens.spend == sum(e.prompt_tokens + e.completion_tokens for e in entries) > 0
    periods = await by_scope["team"].periods(s["team"]["id"], 24)
    assert {(p.window, p.unit) for p in periods} == {("1mo", "usd"), ("1d", "tokens")}
    assert {p.spend for p in periods} == {3 * CENT, tokens.spend}

    for scope in ("user", "end_user", "tag"):
        owner = await by_scope[scope].owner(s[scope]["id"])
        assert owner.budgets[0].spend == 3 * CENT, scope
        got = await by_scope[scope].entries(owner, 25)
        assert {e.request_id for e in got} == {e.request_id for e in entries}, scope
    assert (await by_scope["tag"].owner(s["tag"]["id"])).label == "batch"
    end_user = await by_scope["end_user"].owner(s["end_user"]["id"])
    assert end_user.label == "cust-1" and end_user.details["seen under"].endswith(s["team"]["id"])

    alone = await by_scope["key"].owner(s["other"]["id"])
    (only,) = await by_scope["key"].entries(alone, 25)
    assert only.team_id is None and only.tags is None


async def test_standings_hold_every_owners_dollar_budgets(gateway: Gateway) -> None:
    s = await scene(gateway)
    summary = await reads.standings(gateway.state.engine, 25)
    top = [(t.scope, t.owner_id, t.window) for t in summary.top]
    # The tag is exhausted (3 of 3 cents), the team at 60 %; then the rest by share used.
    assert top[:2] == [("tag", s["tag"]["id"], "1mo"), ("team", s["team"]["id"], "1mo")]
    assert summary.top[0].owner_name == "batch" and summary.top[0].used == 1.0
    assert {t[0] for t in top} == {"key", "team", "user", "end_user", "tag"}
    # Dollar budgets only: the team's tokens budget is not money.
    assert len(top) == summary.budgets == 6 and summary.owners == 6
    assert (summary.exhausted, summary.near) == (1, 1)
    # Money is the keys' own budgets': every dollar once.
    assert (summary.spend, summary.limit) == (4 * CENT, 2 * 1000 * CENT)

    r = await gateway.admin("DELETE", f"/admin/tags/{s['tag']['id']}")
    assert r.status_code == 200, r.text
    after = await reads.standings(gateway.state.engine, 25)
    assert "tag" not in {t.scope for t in after.top} and after.budgets == 5


async def test_owner_pages_and_list(gateway: Gateway) -> None:
    s = await scene(gateway)
    assert (await sign_in(gateway.client, ADMIN_KEY)).status_code == 303
    overview = (await gateway.client.get("/ui/")).text
    assert f'href="/ui/owners/tag/{s["tag"]["id"]}"' in overview
    assert f'href="/ui/owners/team/{s["team"]["id"]}"' in overview

    page = await gateway.client.get(f"/ui/owners/team/{s['team']['id']}")
    assert page.status_code == 200
    assert "research" in page.text and "1,000 tokens" in page.text
    assert page.text.count('<tr class="outcome-ok">') == 3
    assert 'aria-current="page">Owners' in page.text
    assert 'href="/ui/owners/key/' + s["key"]["id"] + '">in-team</a>' in page.text  # whose key
    for params in (
        {"team_id": s["team"]["id"]},
        {"tag": "batch"},
        {"end_user_id": s["end_user"]["id"]},
    ):
        ledger = await gateway.client.get("/ui/ledger", params={**params, "outcome": "ok"})
        assert ledger.text.count('<tr class="outcome-ok">') == 3, params
        assert 'id="owner-filter"' in ledger.text and 'type="hidden"' in ledger.text
    tag_page = (await gateway.client.get(f"/ui/owners/tag/{s['tag']['id']}")).text
    assert 'href="/ui/ledger?tag=batch"' in tag_page

    listed = await gateway.client.get("/ui/owners", params={"scope": "tag"})
    assert f'data-owner="{s["tag"]["id"]}"' in listed.text
    assert s["team"]["id"] not in listed.text
    found = await gateway.client.get("/ui/owners", params={"q": "RESEAR"})
    assert f'data-owner="{s["team"]["id"]}"' in found.text and "1 owner" in found.text
    assert "cust-1" in (await gateway.client.get("/ui/owners")).text

    assert (await gateway.client.get("/ui/owners/planet/x")).status_code == 404
    assert (await gateway.client.get("/ui/owners/team/team_nobody")).status_code == 404


async def test_ledger_search_pages_through_every_entry_and_refuses_a_bad_cursor(
    gateway: Gateway,
) -> None:
    s = await scene(gateway)
    engine = gateway.state.engine
    seen: list[str] = []
    cursor = None
    while True:
        rows, cursor = await reads.search_ledger(engine, reads.LedgerQuery(), 3, cursor)
        seen += [r.request_id for r in rows]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 4
    only = reads.LedgerQuery(key_id=s["other"]["id"], outcome="ok", model="bg-test")
    assert len((await reads.search_ledger(engine, only, 10, None))[0]) == 1
    assert (await sign_in(gateway.client, ADMIN_KEY)).status_code == 303
    assert (
        await gateway.client.get("/ui/ledger", params={"cursor": "nonsense"})
    ).status_code == 422

"""Every budget that applies to a request is held in one step (SPEC 11): the key's, its team's,
its user's, its tags', narrowed to its model, each in its unit; any one of them refuses, and the
429 names it. On both ledgers."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from app.ledger.repository import reconcile
from tests.conftest import Gateway
from tests.scopes.helpers import NANOS, budget, chat, join, owner, periods_of, set_limit

CENT = NANOS // 100


async def assert_reconciled(gw: Gateway) -> None:
    report = await reconcile(gw.state.engine)
    assert report.ok, report


async def test_a_spent_user_budget_refuses_a_key_of_a_team_and_says_so(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=10)
    team, user = await owner(gw, "team", "ml"), await owner(gw, "user", "ann")
    await join(gw, key["id"], team, user)
    team_budget = await budget(gw, "team", team, 5, duration="1mo", kind="primary")
    user_budget = await budget(gw, "user", user, 0.02, duration="1mo", kind="primary")
    assert (await chat(gw, key["key"])).status_code == 200  # $0.01 each
    assert (await chat(gw, key["key"])).status_code == 200
    r = await chat(gw, key["key"])
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "budget_exceeded"
    assert error["message"].startswith("Budget exceeded for user 'ann' (1mo): spend $0.0200")
    assert key["key"] not in error["message"]
    assert "retry-after" in r.headers
    # Every budget of the request was charged, each once.
    assert [p["spend"] for p in await periods_of(gw, team_budget)] == [2 * CENT]
    assert [p["spend"] for p in await periods_of(gw, user_budget)] == [2 * CENT]
    # Raising the user's budget admits again.
    await set_limit(gw, user_budget, 1)
    assert (await chat(gw, key["key"])).status_code == 200
    await assert_reconciled(gw)


@pytest.mark.parametrize("scope", ["key", "team", "user", "tag"])
async def test_each_scope_alone_refuses(gateway: Gateway, scope: str) -> None:
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=10)
    team, user = await owner(gw, "team", "ml"), await owner(gw, "user", "ann")
    tag = await owner(gw, "tag", "project-x")
    await join(gw, key["id"], team, user)
    owners = {"key": key["id"], "team": team, "user": user, "tag": tag}
    for kind, owner_id in owners.items():
        await budget(gw, kind, owner_id, 0.01 if kind == scope else 5, duration="1d")
    headers = {"x_budget_tags": "project-x, other"}
    assert (await chat(gw, key["key"], **headers)).status_code == 200
    r = await chat(gw, key["key"], **headers)
    assert r.status_code == 429, r.text
    named = {"key": "key 'k'", "team": "team 'ml'", "user": "user 'ann'", "tag": "tag 'project-x'"}
    assert named[scope] in r.json()["error"]["message"]
    if scope == "tag":  # without the tag, its budget does not apply
        assert (await chat(gw, key["key"])).status_code == 200
    await assert_reconciled(gw)


async def test_tags_come_from_headers_and_the_body(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=10)
    a, b = await owner(gw, "tag", "a"), await owner(gw, "tag", "b")
    budget_a = await budget(gw, "tag", a, 5)
    budget_b = await budget(gw, "tag", b, 5)
    body = {
        "model": "bg-test",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 10,
        "metadata": {"tags": ["b"]},
    }
    headers = {"authorization": f"Bearer {key['key']}", "x-litellm-tags": "a"}
    r = await gw.client.post("/v1/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert [p["spend"] for p in await periods_of(gw, budget_a)] == [CENT]
    assert [p["spend"] for p in await periods_of(gw, budget_b)] == [CENT]
    entries = (await gw.admin("GET", "/admin/ledger", params={"key_id": key["id"]})).json()
    assert len(entries["data"]) == 1
    bad = await chat(gw, key["key"], x_budget_tags="x" * 300)
    assert bad.status_code == 422 and "x-budget-tags" in bad.json()["error"]["message"]


async def test_a_model_narrowed_budget_holds_only_its_models(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=10)
    narrowed = await budget(gw, "key", key["id"], 0, models=["bg-priced"])
    for _ in range(3):
        assert (await chat(gw, key["key"])).status_code == 200  # bg-test
    [period] = await periods_of(gw, narrowed)
    assert (period["spend"], period["reserved"]) == (0, 0)
    r = await chat(gw, key["key"], model="bg-priced")
    assert r.status_code == 429 and "window" not in r.json()["error"]["message"]
    await assert_reconciled(gw)


async def test_a_requests_budget_admits_its_count_per_window(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=10)
    per_minute = await budget(gw, "key", key["id"], 10, unit="requests", duration="1m")
    for window in range(2):
        statuses = [(await chat(gw, key["key"])).status_code for _ in range(12)]
        assert statuses == [200] * 10 + [429] * 2, (window, statuses)
        gw.clock.advance(timedelta(minutes=1))
    assert (await chat(gw, key["key"])).status_code == 200
    assert [p["spend"] for p in await periods_of(gw, per_minute)] == [10, 10, 1]
    await assert_reconciled(gw)


async def test_a_tokens_budget_is_charged_input_and_output_tokens(gateway: Gateway) -> None:
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=10)
    tokens = await budget(gw, "key", key["id"], 100_000, unit="tokens", duration="1d")
    r = await chat(gw, key["key"], tokens=25)
    assert r.status_code == 200
    usage = r.json()["usage"]
    [period] = await periods_of(gw, tokens)
    assert period["spend"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert period["reserved"] == 0
    # A tokens budget without room for the request's token bound refuses it.
    small = await budget(gw, "key", key["id"], 50, unit="tokens", duration="1d")
    r = await chat(gw, key["key"], tokens=100)
    assert r.status_code == 429 and "tokens" in r.json()["error"]["message"]
    assert [p["spend"] for p in await periods_of(gw, small)] == [0]
    await assert_reconciled(gw)


async def test_a_team_budget_shared_by_ten_keys_admits_exactly_what_fits(
    gateway: Gateway,
) -> None:
    gw = gateway
    team = await owner(gw, "team", "ml")
    team_budget = await budget(gw, "team", team, 0.37, duration="1mo", kind="primary")
    keys = [await gw.create_key(alias=f"k{i}", max_budget=10) for i in range(10)]
    for key in keys:
        await join(gw, key["id"], team)
    results = await asyncio.gather(*(chat(gw, keys[i % 10]["key"]) for i in range(200)))
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == 37 and statuses.count(429) == 163
    assert all("team 'ml'" in r.json()["error"]["message"] for r in results if r.status_code == 429)
    [period] = await periods_of(gw, team_budget)
    assert (period["spend"], period["reserved"]) == (37 * CENT, 0)
    await assert_reconciled(gw)


@pytest.mark.parametrize("scope", ["team", "user", "end_user", "tag"])
@pytest.mark.parametrize("rolled_by", ["request", "scheduler"])
async def test_a_monthly_owner_budget_is_enforced_again_after_each_reset(
    gateway: Gateway, scope: str, rolled_by: str
) -> None:
    """The seed scenario (SPEC 5) for an owner's budget: three periods, each spent to its limit,
    refused, then reset by a request or by the scheduler."""
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=100)
    # (an end user of a key without a team is scoped to the key)
    owner_id = await owner(gw, scope, "o", scope=f"key:{key['id']}" if scope == "end_user" else "")
    if scope in ("team", "user"):
        await join(gw, key["id"], **{f"{scope}_id": owner_id})
    monthly = await budget(gw, scope, owner_id, 0.03, duration="1mo", kind="primary")
    headers = {"tag": {"x_budget_tags": "o"}, "end_user": {"x_budget_end_user": "o"}}.get(scope, {})
    for month in range(3):
        for _ in range(3):
            assert (await chat(gw, key["key"], **headers)).status_code == 200, month
        refused = await chat(gw, key["key"], **headers)
        named = f"{scope.replace('_', ' ')} 'o'"
        assert refused.status_code == 429 and named in refused.json()["error"]["message"]
        gw.clock.advance(timedelta(days=32))
        gw.clock.set(gw.clock.now().replace(day=1, hour=0, minute=0))
        if rolled_by == "scheduler":
            assert await gw.state.budgets.close_expired_periods() >= 1
    assert (await chat(gw, key["key"], **headers)).status_code == 200
    periods = await periods_of(gw, monthly)
    assert [p["spend"] for p in periods] == [3 * CENT] * 3 + [CENT]
    assert [p["closed_at"] is not None for p in periods] == [True] * 3 + [False]
    await assert_reconciled(gw)


async def test_a_minute_window_keeps_a_row_a_day(gateway: Gateway) -> None:
    """A `1m` budget's closed periods of a finished day are merged into one (SPEC 11: short
    windows must not grow the ledger by a row per minute forever); spend and charges kept."""
    gw = gateway
    key = await gw.create_key(alias="k", max_budget=100)
    per_minute = await budget(gw, "key", key["id"], 3, unit="requests", duration="1m")
    for minute in range(30):
        assert (await chat(gw, key["key"])).status_code == 200, minute
        if minute % 3 == 0:
            assert (await chat(gw, key["key"])).status_code == 200
        gw.clock.advance(timedelta(minutes=1))
        await gw.state.budgets.close_expired_periods()  # the scheduler's rolls, idle or not
    gw.clock.advance(timedelta(days=1))
    await gw.state.budgets.close_expired_periods()
    before = await periods_of(gw, per_minute)
    assert len(before) == 32 and sum(p["spend"] for p in before) == 40
    assert await gw.state.budgets.compact_short_periods() == 31
    after = await periods_of(gw, per_minute)
    assert len(after) == 2  # the day's, merged, and the open one
    assert sorted(p["spend"] for p in after) == [0, 40]
    assert (await chat(gw, key["key"])).status_code == 200
    await assert_reconciled(gw)
    assert await gw.state.budgets.compact_short_periods() == 0  # nothing more to merge


async def test_v1_budget_lists_the_budgets_of_the_key_its_team_and_its_user(
    gateway: Gateway,
) -> None:
    gw = gateway
    team = (await gw.admin("POST", "/admin/teams", json={"alias": "ml", "max_budget": 5})).json()
    user = (
        await gw.admin(
            "POST",
            "/admin/users",
            json={"alias": "ann", "max_budget": 2, "budget_duration": "1mo"},
        )
    ).json()
    key = await gw.create_key(alias="k", max_budget=1, team_id=team["id"], user_id=user["id"])
    assert (await chat(gw, key["key"])).status_code == 200
    r = await gw.client.get("/v1/budget", headers={"authorization": f"Bearer {key['key']}"})
    assert r.status_code == 200, r.text
    listed = [(b["scope"], b["name"], b["max_budget"], b["spend"]) for b in r.json()["budgets"]]
    assert listed == [
        ("key", "k", 1.0, 0.01),
        ("team", "ml", 5.0, 0.01),
        ("user", "ann", 2.0, 0.01),
    ]
    assert r.json()["budgets"][2]["budget_duration"] == "1mo"

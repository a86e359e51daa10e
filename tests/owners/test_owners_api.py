"""SPEC 11 admin API: teams, users, end users and tags -- create, list, read, change, delete
(softly), reset, periods -- in the keys' shapes; keys in a team and of a user."""

from __future__ import annotations

import pytest

from tests.conftest import Gateway
from tests.keys.helpers import assert_openai_error

KINDS = [
    ("teams", {"alias": "team-a"}),
    ("users", {"alias": "ann"}),
    ("tags", {"name": "batch"}),
]


async def create(gw: Gateway, path: str, **body: object) -> dict:
    r = await gw.admin("POST", f"/admin/{path}", json=body)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize(("path", "naming"), KINDS)
async def test_crud_in_the_shape_of_keys(gateway: Gateway, path: str, naming: dict) -> None:
    created = await create(
        gateway,
        path,
        **naming,
        max_budget=10,
        budget_duration="1mo",
        soft_budget=8,
        metadata={"cost_center": 7},
        budgets=[{"max_budget": 1000, "unit": "tokens", "budget_duration": "1d"}],
    )
    assert created["id"]
    for field, value in naming.items():
        assert created[field] == value
    assert created["max_budget"] == 10.0 and created["soft_budget"] == 8.0
    assert created["spend"] == 0.0 and created["remaining"] == 10.0
    assert created["period_start"] == "2026-01-01T00:00:00Z"
    assert created["reset_at"] == "2026-02-01T00:00:00Z"
    assert created["metadata"] == {"cost_center": 7} and created["deleted_at"] is None
    (window,) = created["budgets"]
    assert window["unit"] == "tokens" and window["models"] is None
    assert window["max_budget"] == 1000 and window["remaining"] == 1000
    assert window["reset_at"] == "2026-01-16T00:00:00Z"

    one = await gateway.admin("GET", f"/admin/{path}/{created['id']}")
    assert one.status_code == 200 and one.json() == created

    listed = (await gateway.admin("GET", f"/admin/{path}", params=naming)).json()
    assert [o["id"] for o in listed["data"]] == [created["id"]]
    assert listed["next_cursor"] is None
    other = {k: "nobody" for k in naming}
    assert (await gateway.admin("GET", f"/admin/{path}", params=other)).json()["data"] == []

    r = await gateway.admin(
        "PATCH", f"/admin/{path}/{created['id']}", json={"max_budget": 20, "metadata": {}}
    )
    assert r.status_code == 200, r.text
    assert r.json()["max_budget"] == 20.0 and r.json()["remaining"] == 20.0
    assert r.json()["metadata"] == {}

    dup = await gateway.admin("POST", f"/admin/{path}", json=naming)
    assert_openai_error(dup, 409, param=next(iter(naming)))

    deleted = await gateway.admin("DELETE", f"/admin/{path}/{created['id']}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["deleted_at"] == "2026-01-15T12:00:00Z"
    # Its budgets are retired: no flat budget, no windows; the periods stay, closed.
    assert deleted.json()["max_budget"] is None and deleted.json()["budgets"] is None
    periods = (await gateway.admin("GET", f"/admin/{path}/{created['id']}/periods")).json()
    assert len(periods["data"]) == 2
    assert {p["close_reason"] for p in periods["data"]} == {"retired"}
    gone = await gateway.admin("PATCH", f"/admin/{path}/{created['id']}", json={"max_budget": 1})
    assert_openai_error(gone, 409)


@pytest.mark.parametrize("path", ["teams", "users", "tags", "end-users"])
async def test_unknown_ids_are_404_and_invalid_fields_422(gateway: Gateway, path: str) -> None:
    for method, suffix in [
        ("GET", ""),
        ("PATCH", ""),
        ("DELETE", ""),
        ("POST", "/reset"),
        ("GET", "/periods"),
    ]:
        kwargs = {"json": {}} if method == "PATCH" else {}
        r = await gateway.admin(method, f"/admin/{path}/nope{suffix}", **kwargs)
        assert_openai_error(r, 404, code="not_found")
    r = await gateway.admin(
        "POST",
        f"/admin/{path}",
        json={"alias": "x", "name": "x", "user": "x", "budget_duration": "2q"},
    )
    err = assert_openai_error(r, 422)
    assert "budget_duration" in err["message"]


async def test_a_non_integral_token_budget_is_422_naming_the_field(gateway: Gateway) -> None:
    r = await gateway.admin(
        "POST",
        "/admin/tags",
        json={"name": "t", "budgets": [{"max_budget": 1.5, "unit": "tokens"}]},
    )
    err = assert_openai_error(r, 422, param="max_budget")
    assert "whole tokens" in err["message"]


async def test_team_parallel_limit_and_end_user_template(gateway: Gateway) -> None:
    template = [
        {"max_budget": 0.5, "budget_duration": "1d"},
        {"max_budget": 100, "unit": "requests", "models": ["bg-test"]},
    ]
    team = await create(
        gateway, "teams", alias="t", max_parallel_requests=4, end_user_budget=template
    )
    assert team["max_parallel_requests"] == 4
    assert team["budgets"] is None  # the parallel limit is not a window
    assert team["max_budget"] is None  # no primary limit given: unlimited, spend tracked
    assert [e["max_budget"] for e in team["end_user_budget"]] == [0.5, 100]
    assert team["end_user_budget"][1]["unit"] == "requests"
    assert team["end_user_budget"][1]["models"] == ["bg-test"]

    r = await gateway.admin(
        "PATCH", f"/admin/teams/{team['id']}", json={"max_parallel_requests": 9}
    )
    assert r.json()["max_parallel_requests"] == 9
    r = await gateway.admin(
        "PATCH", f"/admin/teams/{team['id']}", json={"max_parallel_requests": None}
    )
    assert r.json()["max_parallel_requests"] is None
    periods = (await gateway.admin("GET", f"/admin/teams/{team['id']}/periods")).json()["data"]
    parallel = [p for p in periods if p["unit"] == "parallel"]
    assert len(parallel) == 1 and parallel[0]["close_reason"] == "retired"
    assert parallel[0]["max_budget"] == 9

    bad = await gateway.admin(
        "PATCH",
        f"/admin/teams/{team['id']}",
        json={"end_user_budget": [{"max_budget": 1, "soft_budget": 2}]},
    )
    err = assert_openai_error(bad, 422, param="end_user_budget")
    assert "soft_budget" in err["message"]


async def test_end_users_are_scoped_to_a_team_or_a_key(gateway: Gateway) -> None:
    team = await create(gateway, "teams", alias="t")
    key = await gateway.create_key(alias="k")
    in_team = await create(gateway, "end-users", user="cust-1", team_id=team["id"], max_budget=2)
    of_key = await create(gateway, "end-users", user="cust-1", key_id=key["id"])
    assert (in_team["team_id"], in_team["key_id"], in_team["user"]) == (team["id"], None, "cust-1")
    assert (of_key["team_id"], of_key["key_id"]) == (None, key["id"])
    assert of_key["max_budget"] is None and of_key["spend"] == 0.0

    dup = await gateway.admin(
        "POST", "/admin/end-users", json={"user": "cust-1", "team_id": team["id"]}
    )
    assert_openai_error(dup, 409, param="user")
    both = await gateway.admin(
        "POST", "/admin/end-users", json={"user": "x", "team_id": team["id"], "key_id": key["id"]}
    )
    assert_openai_error(both, 422)
    ghost = await gateway.admin("POST", "/admin/end-users", json={"user": "x", "team_id": "t_1"})
    assert_openai_error(ghost, 422, param="team_id")

    by_team = (
        await gateway.admin("GET", "/admin/end-users", params={"team_id": team["id"]})
    ).json()
    assert [e["id"] for e in by_team["data"]] == [in_team["id"]]
    by_key = (await gateway.admin("GET", "/admin/end-users", params={"key_id": key["id"]})).json()
    assert [e["id"] for e in by_key["data"]] == [of_key["id"]]
    by_user = (await gateway.admin("GET", "/admin/end-users", params={"user": "cust-1"})).json()
    assert len(by_user["data"]) == 2

    # An end user without a budget gets one when an admin sets it.
    r = await gateway.admin("PATCH", f"/admin/end-users/{of_key['id']}", json={"max_budget": 3})
    assert r.status_code == 200, r.text
    assert r.json()["max_budget"] == 3.0 and r.json()["remaining"] == 3.0


async def test_listing_pages_with_a_cursor(gateway: Gateway) -> None:
    ids = [(await create(gateway, "tags", name=f"tag-{i}"))["id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await gateway.admin("GET", "/admin/tags", params=params)).json()
        seen += [t["id"] for t in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids)
    r = await gateway.admin("GET", "/admin/tags", params={"cursor": "a2V5X3g"})  # a key cursor
    assert_openai_error(r, 422, param="cursor")


async def test_keys_in_a_team_and_of_a_user(gateway: Gateway) -> None:
    team = await create(gateway, "teams", alias="t")
    user = await create(gateway, "users", alias="ann")
    key = await gateway.create_key(
        alias="k",
        team_id=team["id"],
        user_id=user["id"],
        max_parallel_requests=3,
        end_user_budget=[{"max_budget": 1}],
        model_budgets=[{"max_budget": 2, "models": ["bg-priced"], "budget_duration": "1d"}],
        budgets=[{"max_budget": 5000, "unit": "tokens"}],
    )
    assert key["team_id"] == team["id"] and key["user_id"] == user["id"]
    assert key["max_parallel_requests"] == 3
    assert key["end_user_budget"][0]["max_budget"] == 1.0
    units = sorted((b["unit"], b["models"]) for b in key["budgets"])
    assert units == [("tokens", None), ("usd", ["bg-priced"])]
    other = await gateway.create_key(alias="other")

    listed = (await gateway.admin("GET", "/admin/keys", params={"team_id": team["id"]})).json()
    assert [k["id"] for k in listed["data"]] == [key["id"]]

    # A team or user with active keys is not deleted: the 409 names the keys.
    for path, owner in (("teams", team), ("users", user)):
        r = await gateway.admin("DELETE", f"/admin/{path}/{owner['id']}")
        err = assert_openai_error(r, 409)
        assert key["id"] in err["message"]
    r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"team_id": None})
    assert r.status_code == 200 and r.json()["team_id"] is None
    assert (await gateway.admin("DELETE", f"/admin/teams/{team['id']}")).status_code == 200
    # A deleted (or unknown) team or user cannot be given to a key.
    for field, value in (("team_id", team["id"]), ("user_id", "user_nope")):
        r = await gateway.admin("PATCH", f"/admin/keys/{other['id']}", json={field: value})
        assert_openai_error(r, 422, param=field)
        r = await gateway.admin("POST", "/admin/keys", json={field: value})
        assert_openai_error(r, 422, param=field)
    bad = await gateway.admin("POST", "/admin/keys", json={"model_budgets": [{"max_budget": 1}]})
    err = assert_openai_error(bad, 422)
    assert "model_budgets" in err["message"]


async def test_reset_closes_the_periods_early_like_a_key(gateway: Gateway) -> None:
    team = await create(
        gateway,
        "teams",
        alias="t",
        max_budget=10,
        budget_duration="1mo",
        budgets=[{"max_budget": 50, "unit": "requests", "budget_duration": "1d"}],
        max_parallel_requests=2,
    )
    gateway.clock.advance(3600)
    r = await gateway.admin("POST", f"/admin/teams/{team['id']}/reset")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["period_start"] == "2026-01-15T13:00:00Z"
    assert out["reset_at"] == team["reset_at"]  # the same scheduled boundary
    assert out["budgets"][0]["period_start"] == "2026-01-15T13:00:00Z"
    assert out["max_parallel_requests"] == 2
    periods = (await gateway.admin("GET", f"/admin/teams/{team['id']}/periods")).json()["data"]
    manual = [p for p in periods if p["close_reason"] == "manual"]
    assert len(manual) == 2  # the primary and the window; not the parallel limit
    assert {p["unit"] for p in manual} == {"usd", "requests"}
    assert sum(p["closed_at"] is None for p in periods) == 3


async def test_patch_budgets_replaces_the_windows_keeping_their_history(gateway: Gateway) -> None:
    user = await create(
        gateway, "users", alias="ann", budgets=[{"max_budget": 3, "budget_duration": "1d"}]
    )
    r = await gateway.admin(
        "PATCH",
        f"/admin/users/{user['id']}",
        json={"budgets": [{"max_budget": 7, "unit": "requests", "models": ["bg-test"]}]},
    )
    assert r.status_code == 200, r.text
    (window,) = r.json()["budgets"]
    assert (window["max_budget"], window["unit"], window["models"]) == (7, "requests", ["bg-test"])
    assert window["budget_id"] != user["budgets"][0]["budget_id"]
    periods = (await gateway.admin("GET", f"/admin/users/{user['id']}/periods")).json()["data"]
    old = [p for p in periods if p["budget_id"] == user["budgets"][0]["budget_id"]]
    assert len(old) == 1 and old[0]["close_reason"] == "retired" and old[0]["max_budget"] == 3.0


async def test_a_key_s_parallel_limit_is_not_a_window_and_survives_a_reset(
    gateway: Gateway,
) -> None:
    key = await gateway.create_key(alias="k", max_budget=1, max_parallel_requests=2)
    assert key["max_parallel_requests"] == 2 and key["budgets"] is None
    r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_parallel_requests": 5})
    assert r.json()["max_parallel_requests"] == 5
    gateway.clock.advance(60)
    r = await gateway.admin("POST", f"/admin/keys/{key['id']}/reset")
    assert r.json()["max_parallel_requests"] == 5
    periods = (await gateway.admin("GET", f"/admin/keys/{key['id']}/periods")).json()["data"]
    assert sorted((p["unit"], p["close_reason"] or "open") for p in periods) == [
        ("parallel", "open"),
        ("usd", "manual"),
        ("usd", "open"),
    ]
    r = await gateway.admin(
        "PATCH", f"/admin/keys/{key['id']}", json={"max_parallel_requests": None}
    )
    assert r.json()["max_parallel_requests"] is None
    bad = await gateway.admin(
        "PATCH",
        f"/admin/keys/{key['id']}",
        json={"end_user_budget": [{"max_budget": 5, "unit": "tokens", "soft_budget": 0.5}]},
    )
    assert_openai_error(bad, 422, param="end_user_budget")


async def test_patch_of_a_key_s_budgets_replaces_its_windows(gateway: Gateway) -> None:
    key = await gateway.create_key(
        alias="k", max_budget=1, budgets=[{"max_budget": 0.5, "budget_duration": "1d"}]
    )
    r = await gateway.admin(
        "PATCH",
        f"/admin/keys/{key['id']}",
        json={
            "budgets": [{"max_budget": 100, "unit": "requests", "budget_duration": "1h"}],
            "model_budgets": [{"max_budget": 0.2, "models": ["bg-priced"]}],
        },
    )
    assert r.status_code == 200, r.text
    shown = sorted((b["unit"], b["max_budget"], b["models"]) for b in r.json()["budgets"])
    assert shown == [("requests", 100, None), ("usd", 0.2, ["bg-priced"])]
    assert r.json()["max_budget"] == 1.0  # the key's own budget is not a window
    r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"budgets": []})
    assert r.json()["budgets"] is None

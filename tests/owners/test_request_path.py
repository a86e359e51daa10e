"""The admin API's owners as the request path meets them (SPEC 11): a key created in a team
through the API, an end user created on first sight with the team's template, refused when its
budget is spent while another end user of the team is not; usage grouped by them."""

from __future__ import annotations

from app.ledger.repository import reconcile
from tests.conftest import Gateway


async def post(gw: Gateway, key: str, end_user: str):  # noqa: ANN201
    return await gw.client.post(
        "/v1/chat/completions",
        json={
            "model": "bg-test",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10,
        },
        headers={"authorization": f"Bearer {key}", "x-budget-end-user": end_user},
    )


async def chat(gw: Gateway, key: str, end_user: str) -> int:
    return (await post(gw, key, end_user)).status_code


async def test_end_users_get_the_team_template_on_first_sight(gateway: Gateway) -> None:
    gw = gateway
    r = await gw.admin(
        "POST",
        "/admin/teams",
        json={"alias": "t", "end_user_budget": [{"max_budget": 0.02, "budget_duration": "1d"}]},
    )
    team = r.json()
    key = await gw.create_key(alias="k", team_id=team["id"])
    assert [await chat(gw, key["key"], "alice") for _ in range(2)] == [200, 200]
    refused = await post(gw, key["key"], "alice")
    assert refused.status_code == 429 and "alice" in refused.json()["error"]["message"]
    assert await chat(gw, key["key"], "bob") == 200

    listed = (await gw.admin("GET", "/admin/end-users", params={"team_id": team["id"]})).json()
    by_name = {e["user"]: e for e in listed["data"]}
    assert set(by_name) == {"alice", "bob"}
    assert by_name["alice"]["spend"] == 0.02 and by_name["alice"]["remaining"] == 0.0
    assert by_name["bob"]["spend"] == 0.01 and by_name["bob"]["max_budget"] == 0.02

    usage = (await gw.admin("GET", "/admin/usage", params={"group_by": "end_user"})).json()
    spend = {row["end_user"]: row["spend"] for row in usage["data"]}
    assert spend == {by_name["alice"]["id"]: 0.02, by_name["bob"]["id"]: 0.01}
    team_usage = (await gw.admin("GET", "/admin/usage", params={"group_by": "team"})).json()
    assert [(row["team"], row["spend"]) for row in team_usage["data"]] == [(team["id"], 0.03)]

    # An admin's reset gives alice her budget again.
    assert (await gw.admin("POST", f"/admin/end-users/{by_name['alice']['id']}/reset")).is_success
    assert await chat(gw, key["key"], "alice") == 200
    assert (await reconcile(gw.state.engine)).ok

"""`budgetgate teams|users|end-users|tags ...` against a SQLite ledger: the admin API's objects
in JSON, tables otherwise, the API's validation messages."""

from __future__ import annotations

from typing import Any

import orjson

from tests.test_cli_keys import cli

__all__ = ["cli"]


def test_team_lifecycle(cli: Any) -> None:
    team = orjson.loads(
        cli(
            "teams", "create", "--alias", "research", "--max-budget", "25",
            "--budget-duration", "1mo", "--max-parallel-requests", "4",
            "--budgets", '[{"max_budget": 5000, "unit": "tokens", "budget_duration": "1d"}]',
            "--end-user-budget", '[{"max_budget": 1}]', "--json",
        )
    )  # fmt: skip
    assert team["alias"] == "research" and team["max_budget"] == 25.0
    assert team["max_parallel_requests"] == 4 and team["budgets"][0]["unit"] == "tokens"
    assert team["end_user_budget"][0]["max_budget"] == 1.0

    table = cli("teams", "list")
    assert "research" in table and team["id"] in table and "25.0" in table
    assert orjson.loads(cli("teams", "get", team["id"], "--json")) == team

    changed = orjson.loads(
        cli("teams", "update", team["id"], "--max-budget", "30",
            "--max-parallel-requests", "none", "--json")
    )  # fmt: skip
    assert changed["max_budget"] == 30.0 and changed["max_parallel_requests"] is None
    reset = orjson.loads(cli("teams", "reset", team["id"], "--json"))
    assert reset["spend"] == 0.0
    periods = orjson.loads(cli("teams", "periods", team["id"], "--json"))
    assert {p["close_reason"] for p in periods} == {None, "manual", "retired"}
    deleted = orjson.loads(cli("teams", "delete", team["id"], "--json"))
    assert deleted["deleted_at"] is not None and deleted["max_budget"] is None

    out = cli("teams", "create", "--alias", "x", "--budget-duration", "2q", code=2)
    assert "budget_duration" in out
    out = cli("teams", "get", "team_nope", code=1)
    assert "no team with id 'team_nope'" in out


def test_end_users_users_and_tags(cli: Any) -> None:
    key = orjson.loads(cli("keys", "create", "--alias", "k", "--json"))
    end_user = orjson.loads(
        cli("end-users", "create", "--user", "cust-9", "--key-id", key["id"],
            "--max-budget", "2", "--json")
    )  # fmt: skip
    assert end_user["key_id"] == key["id"] and end_user["max_budget"] == 2.0
    listed = orjson.loads(cli("end-users", "list", "--key-id", key["id"], "--json"))
    assert [e["id"] for e in listed] == [end_user["id"]]
    assert "cust-9" in cli("end-users", "list", "--user", "cust-9")

    user = orjson.loads(cli("users", "create", "--alias", "ann", "--json"))
    tag = orjson.loads(cli("tags", "create", "--name", "batch", "--max-budget", "3", "--json"))
    assert user["alias"] == "ann" and tag["name"] == "batch"
    assert "already exists" in cli("tags", "create", "--name", "batch", code=1)

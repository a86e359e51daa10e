"""`budgetgate keys …` and `budgetgate usage`, straight against a SQLite ledger (SPEC 1): tables
by default, `--json` on request (one key: its object, as the admin API returns it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.config import get_settings


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.chdir(tmp_path)  # no stray .env
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BUDGETGATE_")}
    env["BUDGETGATE_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path}/ledger.db"

    def run(*args: str, code: int = 0) -> str:
        get_settings.cache_clear()
        try:
            result = CliRunner().invoke(cli_app, list(args), env=env)
        finally:
            get_settings.cache_clear()
        assert result.exit_code == code, (args, result.output, result.exception)
        return result.output

    return run


def test_keys_lifecycle_in_json(cli: Any) -> None:
    created = orjson.loads(
        cli(
            "keys",
            "create",
            "--alias",
            "team-a",
            "--max-budget",
            "1.5",
            "--budget-duration",
            "1mo",
            "--soft-budget",
            "1",
            "--alert-at",
            "0.8, 0.5,1",
            "--model",
            "gpt-4o",
            "--json",
        )
    )
    assert isinstance(created, dict)
    assert created["key"].startswith("sk-bg-") and created["alias"] == "team-a"
    assert created["max_budget"] == 1.5 and created["soft_budget"] == 1.0
    assert created["models"] == ["gpt-4o"] and created["spend"] == 0 and created["reset_at"]
    assert created["alert_at"] == [0.5, 0.8, 1.0]
    key_id = created["id"]

    shown = orjson.loads(cli("keys", "show", key_id, "--json"))
    assert shown["id"] == key_id and "key" not in shown  # the plaintext key: only at creation

    # A max_budget under the soft budget is how a key is frozen (max_budget 0): allowed.
    frozen = orjson.loads(cli("keys", "update", key_id, "--max-budget", "0", "--json"))
    assert frozen["max_budget"] == 0 and frozen["soft_budget"] == 1.0
    updated = orjson.loads(cli("keys", "update", key_id, "--alert-at", "0.9", "--json"))
    assert updated["alert_at"] == [0.9] and updated["max_budget"] == 0
    cleared = orjson.loads(cli("keys", "update", key_id, "--alert-at", "", "--json"))
    assert cleared["alert_at"] == [] and cleared["soft_budget"] == 1.0
    assert orjson.loads(cli("keys", "reset", key_id, "--json"))["id"] == key_id

    other = orjson.loads(
        cli(
            "keys",
            "create",
            "--alias",
            "team-b",
            "--budget-duration",
            "1d",
            "--budget-anchor",
            "2026-01-01T06:00:00Z",
            "--expires-at",
            "2030-01-01T00:00:00Z",
            "--metadata",
            '{"team": "b"}',
            "--json",
        )
    )
    assert other["budget_anchor"] == "2026-01-01T06:00:00Z"
    assert other["expires_at"] == "2030-01-01T00:00:00Z" and other["metadata"] == {"team": "b"}
    assert other["reset_at"].endswith("T06:00:00Z")
    changed = orjson.loads(
        cli(
            "keys",
            "update",
            other["id"],
            "--model",
            "m1",
            "--model",
            "m2",
            "--metadata",
            '{"team": "c"}',
            "--expires-at",
            "2031-01-01T00:00:00Z",
            "--json",
        )
    )
    assert changed["models"] == ["m1", "m2"] and changed["metadata"] == {"team": "c"}
    assert changed["expires_at"] == "2031-01-01T00:00:00Z"
    listed = orjson.loads(cli("keys", "list", "--json"))
    assert sorted(k["alias"] for k in listed) == ["team-a", "team-b"]
    assert [k["id"] for k in orjson.loads(cli("keys", "list", "--alias", "team-a", "--json"))] == [
        key_id
    ]

    assert orjson.loads(cli("keys", "revoke", key_id, "--json"))["status"] == "revoked"
    assert orjson.loads(cli("usage", "--json")) == []  # no traffic yet
    # Bare dates and times without an offset are UTC (as in the admin API).
    for since in ("2026-12-01", "2026-12-01T08:00:00", "2026-12-01T08:00:00+02:00"):
        assert orjson.loads(cli("usage", "--since", since, "--until", "2027-01-01", "--json")) == []


def test_keys_tables_and_errors(cli: Any) -> None:
    out = cli("keys", "create", "--alias", "team-a", "--max-budget", "2")
    assert out.splitlines()[0].split()[:3] == ["key", "id", "alias"]
    assert "sk-bg-" in out and "shown only once" in out
    assert "team-a" in cli("keys", "list")
    assert "no key with id" in cli("keys", "show", "key_missing", code=1)
    assert "not a dollar amount" in cli("keys", "create", "--max-budget", "lots", code=2)
    assert "budget_duration" in cli("keys", "create", "--budget-duration", "1month", code=2)
    assert "--metadata" in cli("keys", "create", "--metadata", "[1]", code=2)
    assert "expires_at" in cli("keys", "create", "--expires-at", "tomorrow", code=2)
    assert "alert_at.1" in cli("keys", "create", "--max-budget", "1", "--alert-at", "0.5,2", code=2)
    assert "set a max_budget" in cli("keys", "create", "--alert-at", "0.5", code=1)
    assert "--group-by must be one of" in cli("usage", "--group-by", "project", code=2)
    assert cli("usage", "--group-by", "team").split()[:2] == ["team", "requests"]


def test_version(cli: Any) -> None:
    out = cli("--version")
    assert out.startswith("budgetgate ") and out.split()[1][0].isdigit(), out

"""The ledger commands (`usage`, `ledger`, `keys periods`, `reconcile`) and what every command
does with the database it is given: `--database-url`, `--format table|json|csv` (JSON as the
admin API returns it), `migrate`'s report, and one line with exit 1 on a database that is not
migrated or cannot be reached."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.clock import ManualClock
from app.config import get_settings
from tests.conftest import START, make_settings, running_gateway
from tests.pgcluster import PgCluster
from tests.procs import base_env, budgetgate_bin, free_port
from tests.servers import ServerThread

# Every command that reads or writes the ledger, with arguments that make it do so.
LEDGER_COMMANDS = [
    ["keys", "list"],
    ["keys", "show", "key_missing"],
    ["keys", "create", "--alias", "a"],
    ["keys", "update", "key_missing", "--alias", "b"],
    ["keys", "revoke", "key_missing"],
    ["keys", "reset", "key_missing"],
    ["keys", "periods", "key_missing"],
    ["usage"],
    ["ledger"],
    ["reconcile"],
]


def run_cli(*args: str, database_url: str | None = None, code: int = 0) -> str:
    """The command in-process, with no BUDGETGATE_ setting but the database URL (if any)."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BUDGETGATE_")}
    # Always named, so that the runner puts it back: `serve --database-url` sets it.
    env["BUDGETGATE_DATABASE_URL"] = database_url
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, list(args), env=env)
    finally:
        get_settings.cache_clear()
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == code, (args, result.output)
    return result.output


@pytest.fixture(autouse=True)
def _no_stray_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


# -- migrate, and the database a command uses ---------------------------------------------


def test_migrate_names_the_default_sqlite_file_and_what_it_applied(tmp_path: Path) -> None:
    out = run_cli("migrate")
    assert f"ledger database: SQLite {tmp_path / 'budgetgate.db'}" in out
    applied = [line for line in out.splitlines() if line.startswith("applied ")]
    assert applied[0].startswith("applied 0001: ") and len(applied) >= 7, out
    assert "ledger schema is at the latest migration" in out
    again = run_cli("migrate")
    assert "already up to date" in again and "applied" not in again


def test_every_ledger_command_takes_database_url(tmp_path: Path) -> None:
    chosen = f"sqlite+aiosqlite:///{tmp_path / 'chosen.db'}"
    # The environment names a file in a directory that does not exist: not used.
    elsewhere = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'ledger.db'}"
    run_cli("migrate", "--database-url", chosen, database_url=elsewhere)
    for command in LEDGER_COMMANDS:
        expected = 1 if "key_missing" in command else 0
        run_cli(*command, "--database-url", chosen, database_url=elsewhere, code=expected)
    assert [
        k["alias"]
        for k in orjson.loads(run_cli("keys", "list", "--json", "--database-url", chosen))
    ] == ["a"]
    assert not (tmp_path / "missing").exists()


def test_a_database_that_cannot_be_used_is_one_line_and_exit_1(tmp_path: Path) -> None:
    unreachable = "postgresql+asyncpg://someone:hunter2@127.0.0.1:1/ledger"
    for command in [*LEDGER_COMMANDS, ["migrate"], ["serve"]]:
        out = run_cli(*command, "--database-url", unreachable, code=1)
        assert "cannot use the ledger database (postgresql+asyncpg://127.0.0.1:1/ledger)" in out
        assert "hunter2" not in out and "someone" not in out and "Traceback" not in out


def test_serve_names_its_sqlite_file_and_takes_database_url(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen.db"
    port = free_port()
    serve = subprocess.Popen(
        [budgetgate_bin(), "serve", "--port", str(port), "--database-url", f"sqlite:///{chosen}"],
        env=base_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 45
        while not _healthy(port):
            assert serve.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.1)
    finally:
        serve.terminate()
        _, stderr = serve.communicate(timeout=30)
    assert f"budgetgate: ledger database: SQLite {chosen}" in stderr, stderr
    assert chosen.exists() and not (tmp_path / "budgetgate.db").exists()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_schema_from_a_later_version_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    run_cli("migrate", database_url=url)
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    db.close()
    for command in (["migrate"], ["keys", "list"], ["reconcile"]):
        out = run_cli(*command, database_url=url, code=1)
        assert "cannot migrate the ledger database" in out and "'9999'" in out, out
        assert "Traceback" not in out


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    assert "--since" in run_cli("usage", "--since", "last week", database_url=url, code=2)
    assert "--until" in run_cli("ledger", "--until", "2026-13-01", database_url=url, code=2)
    run_cli("keys", "list", "--format", "xml", database_url=url, code=2)
    out = run_cli("keys", "list", "--database-url", "mysql://h/db", code=2)
    assert "invalid settings: BUDGETGATE_DATABASE_URL" in out


def test_an_unmigrated_postgresql_says_run_migrate(pg_cluster: PgCluster) -> None:
    url = pg_cluster.create_database(f"bg_bare_{uuid.uuid4().hex[:8]}")
    for command in [*LEDGER_COMMANDS, ["serve"]]:
        out = run_cli(*command, database_url=url, code=1)
        assert "is not at the latest migration: run `budgetgate migrate`" in out, (command, out)
        assert "Traceback" not in out and "SELECT" not in out
    out = run_cli("migrate", database_url=url)
    assert "applied 0001: " in out and "ledger schema is at the latest migration" in out
    assert "already up to date" in run_cli("migrate", database_url=url)
    assert orjson.loads(run_cli("keys", "list", "--json", database_url=url)) == []
    assert "ledger is consistent" in run_cli("reconcile", database_url=url)


# -- the ledger's contents, as the admin API shows them -------------------------------------


async def _traffic(
    sqlite_url: str, upstream: ServerThread
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two keys with a few requests; what the admin API says about them."""
    async with running_gateway(make_settings(sqlite_url, upstream.url), ManualClock(START)) as gw:
        # Lifetime budgets: the command runs on the real clock, under which a period of
        # START's day would have ended (and been rolled).
        a = await gw.create_key(alias="team-a", max_budget=10)
        b = await gw.create_key(alias="team-b", max_budget=5)
        for key in (a, a, a, b):
            assert (await gw.chat(key["key"])).status_code == 200
        await gw.admin("POST", f"/admin/keys/{a['id']}/reset")
        api: dict[str, Any] = {
            "ledger": (await gw.admin("GET", "/admin/ledger", params={"limit": 2})).json(),
            "ledger_a": (await gw.admin("GET", "/admin/ledger", params={"key_id": a["id"]})).json(),
            "usage": (await gw.admin("GET", "/admin/usage", params={"group_by": "model"})).json(),
            "periods": (await gw.admin("GET", f"/admin/keys/{a['id']}/periods")).json(),
            "reconcile": (await gw.admin("GET", "/admin/reconcile")).json(),
        }
    return a, api


async def test_ledger_commands_show_what_the_admin_api_shows(
    sqlite_url: str, mock_upstream: ServerThread
) -> None:
    a, api = await _traffic(sqlite_url, mock_upstream)

    def cli(*args: str, code: int = 0) -> str:
        return run_cli(*args, database_url=sqlite_url, code=code)

    async def json_of(*args: str) -> Any:
        return orjson.loads(await asyncio.to_thread(cli, *args, "--format", "json"))

    # JSON: the admin API's own shapes (a page with its cursor; periods under "data").
    page = await json_of("ledger", "--limit", "2")
    assert page == api["ledger"] and page["next_cursor"] is not None
    rest = await json_of("ledger", "--limit", "2", "--cursor", page["next_cursor"])
    assert len(rest["data"]) == 2 and rest["next_cursor"] is None
    assert await json_of("ledger", "--key-id", a["id"]) == api["ledger_a"]
    assert await json_of("usage", "--group-by", "model") == api["usage"]["data"]
    assert await json_of("keys", "periods", a["id"]) == api["periods"]
    assert len(api["periods"]["data"]) == 2  # the reset closed one

    # --since / --until: RFC 3339 with an offset, or a date.
    since = ("--group-by", "model", "--since", "2026-01-15T13:00:00+01:00")
    assert await json_of("usage", *since) == api["usage"]["data"]
    assert await json_of("usage", "--until", "2026-01-15") == []
    assert await json_of("ledger", "--since", "2026-01-16") == {"data": [], "next_cursor": None}

    # Tables, with rich: a header row, then one line per row.
    table = await asyncio.to_thread(cli, "ledger", "--limit", "2")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["finished_at", "request_id", "key_id"]
    assert api["ledger"]["data"][0]["request_id"] in lines[2]
    assert f"more: --cursor {page['next_cursor']}" in table
    usage_table = await asyncio.to_thread(cli, "usage", "--group-by", "model")
    assert "bg-test" in usage_table
    assert f"total spend: {api['usage']['total_spend']}" in usage_table
    periods_table = await asyncio.to_thread(cli, "keys", "periods", a["id"])
    assert "manual" in periods_table

    # CSV: every field, one row per entry.
    rows = list(
        csv.DictReader(io.StringIO(await asyncio.to_thread(cli, "ledger", "--format", "csv")))
    )
    assert len(rows) == 4 and {r["outcome"] for r in rows} == {"ok"}
    assert set(rows[0]) == set(api["ledger"]["data"][0])
    keys_csv = list(
        csv.DictReader(io.StringIO(await asyncio.to_thread(cli, "keys", "list", "--format", "csv")))
    )
    assert sorted(r["alias"] for r in keys_csv) == ["team-a", "team-b"]

    # reconcile: the report in JSON, the overruns in CSV (none here), a text report.
    report = await json_of("reconcile")
    assert report == api["reconcile"]
    assert report["ok"] is True and report["entries_checked"] == 4
    assert (await asyncio.to_thread(cli, "reconcile", "--format", "csv")).splitlines() == [
        "request_id,key_id,reservation,cost,overrun,finished_at"
    ]
    assert "ledger is consistent" in await asyncio.to_thread(cli, "reconcile")
    assert "no key with id" in await asyncio.to_thread(cli, "keys", "periods", "key_x", code=1)

"""BUDGETGATE_DATABASE_URL as users write it: the sync spellings mean the async drivers; anything
else is refused at startup with a clear message (and no password in it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from app.cli import app as cli_app
from app.config import Settings, get_settings


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("sqlite:///./l.db", "sqlite+aiosqlite:///./l.db"),
        ("sqlite+aiosqlite:////tmp/l.db", "sqlite+aiosqlite:////tmp/l.db"),
        ("postgresql://u:p@h:5432/db", "postgresql+asyncpg://u:p@h:5432/db"),
        ("postgres://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("POSTGRESQL+ASYNCPG://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
    ],
)
def test_database_url_spellings_mean_the_async_drivers(given: str, used: str) -> None:
    assert Settings(database_url=given).database_url == used


@pytest.mark.parametrize(
    "given", ["mysql://u:secretpw@h/db", "postgresql+psycopg2://u:secretpw@h/db", "l.db", ""]
)
def test_other_database_urls_are_refused_without_echoing_the_password(given: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(database_url=given)
    (error,) = err.value.errors()
    assert "unsupported database URL" in error["msg"]
    assert "secretpw" not in error["msg"]


def test_migrate_with_a_plain_sqlite_url_works(tmp_path: Path) -> None:
    """Was a traceback ("the asyncio extension requires an async driver")."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BUDGETGATE_")}
    env["BUDGETGATE_DATABASE_URL"] = f"sqlite:///{tmp_path}/ledger.db"
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(cli_app, ["migrate"], env=env)
        env["BUDGETGATE_DATABASE_URL"] = "mysql://u:secretpw@h/db"
        get_settings.cache_clear()
        refused = CliRunner().invoke(cli_app, ["migrate"], env=env)
    finally:
        get_settings.cache_clear()
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "ledger.db").stat().st_size > 0
    assert refused.exit_code != 0
    assert "unsupported database URL" in refused.output and "secretpw" not in refused.output


def test_empty_settings_mean_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`.env.example` as shipped (`BUDGETGATE_ADMIN_KEY=`, `BUDGETGATE_PRICES_FILE=`): an empty
    admin key must not become a key that an empty credential matches (the admin API stays
    disabled: 503), and an empty prices file is no prices file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "BUDGETGATE_ADMIN_KEY=\nBUDGETGATE_PRICES_FILE=\nBUDGETGATE_UPSTREAM_API_KEY=   \n"
    )
    for name in ("ADMIN_KEY", "PRICES_FILE", "UPSTREAM_API_KEY"):
        monkeypatch.delenv(f"BUDGETGATE_{name}", raising=False)
    from_file = Settings()
    monkeypatch.setenv("BUDGETGATE_ADMIN_KEY", "")
    from_env = Settings(_env_file=None)  # type: ignore[call-arg]
    for settings in (from_file, from_env, Settings(_env_file=None, admin_key=" ")):  # type: ignore[call-arg]
        assert settings.admin_key is None
    assert from_file.prices_file is None and from_file.upstream_api_key is None


@pytest.mark.parametrize("url", ["notaurl", "127.0.0.1:4000", "ftp://h/x", "http://"])
def test_upstream_url_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=None, upstream_url=url)  # type: ignore[call-arg]
    (error,) = err.value.errors()
    assert error["loc"] == ("upstream_url",) and "http://" in error["msg"]


@pytest.mark.parametrize("url", ["hooks.slack.com/services/T0/B0/x", "slack", "ftp://h/x"])
def test_alert_webhook_url_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=None, alert_webhook_url=url)  # type: ignore[call-arg]
    (error,) = err.value.errors()
    assert error["loc"] == ("alert_webhook_url",) and "https://" in error["msg"]
    for fine in ("https://hooks.slack.com/services/T0/B0/x", "http://u:p@alerts:9000/hook?t=1"):
        assert Settings(_env_file=None, alert_webhook_url=fine).alert_webhook_url == fine  # type: ignore[call-arg]
    assert Settings(_env_file=None, alert_webhook_url=" ").alert_webhook_url is None  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "url", ["http://user:secret@127.0.0.1:4000", "https://:tok@litellm", "http://u@h:1"]
)
def test_upstream_url_with_user_info_is_refused(url: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=None, upstream_url=url)  # type: ignore[call-arg]
    (error,) = err.value.errors()
    assert error["loc"] == ("upstream_url",) and "BUDGETGATE_UPSTREAM_API_KEY" in error["msg"]


def test_serve_refuses_an_upstream_url_with_user_info(tmp_path: Path) -> None:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BUDGETGATE_")}
    env["BUDGETGATE_DATABASE_URL"] = f"sqlite:///{tmp_path}/ledger.db"
    env["BUDGETGATE_UPSTREAM_URL"] = "http://admin:hunter2@127.0.0.1:4000"
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, ["serve", "--port", "1"], env=env)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "user info" in result.output and "BUDGETGATE_UPSTREAM_API_KEY" in result.output
    assert "hunter2" not in result.output


@pytest.mark.parametrize(
    "value", ["POST", "/v1/x", "FETCH /v1/x", "POST /v1/../key/generate", "POST /v1//x"]
)
def test_malformed_extra_routes_are_refused(value: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=None, extra_routes=value)  # type: ignore[call-arg]
    (error,) = err.value.errors()
    assert error["loc"] == ("extra_routes",)


def test_serve_refuses_an_unreadable_prices_file(tmp_path: Path) -> None:
    """A clean message and exit 2 (like any invalid setting), not a traceback from a worker."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BUDGETGATE_")}
    env["BUDGETGATE_DATABASE_URL"] = f"sqlite:///{tmp_path}/ledger.db"
    env["BUDGETGATE_PRICES_FILE"] = str(tmp_path / "missing.yaml")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, ["serve", "--port", "1"], env=env)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "BUDGETGATE_PRICES_FILE" in result.output and "missing.yaml" in result.output

"""Shared assertions for the key / admin / error tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import inspect, text

from tests.conftest import ADMIN_KEY, Gateway, _fresh_pg_database, copy_sqlite
from tests.pgcluster import PgCluster

ERROR_KEYS = {"message", "type", "code", "param"}


def assert_openai_error(
    r: httpx.Response,
    status: int,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    in_message: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`r` is an OpenAI-format error with this status; returns the `error` object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["code"] is None or isinstance(err["code"], str), err
    assert err["param"] is None or isinstance(err["param"], str), err
    # Never a stack trace in a response.
    for marker in ("Traceback", 'File "', "sqlalchemy", "asyncpg", "aiosqlite"):
        assert marker not in r.text, r.text
    if type is not None:
        assert err["type"] == type, err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    for fragment in in_message:
        assert fragment in err["message"], (fragment, err["message"])
    return err


async def mock_stats(upstream_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"{upstream_url}/mock/stats")
        r.raise_for_status()
        return r.json()


async def upstream_requests(upstream_url: str) -> int:
    return int((await mock_stats(upstream_url))["requests"])


async def ledger(gw: Gateway, key_id: str | None = None) -> list[dict[str, Any]]:
    params = {"limit": 1000}
    if key_id is not None:
        params["key_id"] = key_id  # type: ignore[assignment]
    r = await gw.admin("GET", "/admin/ledger", params=params)
    assert r.status_code == 200, r.text
    return r.json()["data"]  # type: ignore[no-any-return]


async def key_object(gw: Gateway, key_id: str) -> dict[str, Any]:
    r = await gw.admin("GET", f"/admin/keys/{key_id}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def all_database_text(gw: Gateway) -> str:
    """Every value of every column of every table, as one string."""
    engine = gw.state.engine
    async with engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        parts = []
        for table in tables:
            q = f'SELECT * FROM "{table}"'
            for row in (await conn.execute(text(q))).all():
                parts.extend(repr(v) for v in row)
                parts.extend(str(v) for v in row)
        await conn.rollback()
    return "\n".join(parts)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def admin_with_headers(
    gw: Gateway, method: str, path: str, headers: dict[str, str], **kwargs: Any
) -> httpx.Response:
    """An admin call with extra request headers."""
    all_headers = {"authorization": f"Bearer {ADMIN_KEY}", **headers}
    return await gw.client.request(method, path, headers=all_headers, **kwargs)


# -- a faster `database_url`: PostgreSQL emptied instead of copied ----------------------------
# Same databases as tests/conftest.py's fixture (SQLite copied from the migrated template, and
# PostgreSQL at the latest migration), but one PostgreSQL database is emptied before each test
# instead of a new one copied from the template.


@pytest.fixture(scope="session")
def pg_reused(pg_cluster: PgCluster) -> tuple[PgCluster, str, str]:
    """One PostgreSQL database copied from the migrated template, emptied before each test
    (TRUNCATE ... RESTART IDENTITY: the same state as a fresh copy, much faster)."""
    url = _fresh_pg_database(pg_cluster)
    name = url.rsplit("/", 1)[1]
    tables = pg_cluster.psql(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
        "AND tablename <> 'alembic_version' ORDER BY tablename",
        dbname=name,
    ).split()
    assert tables
    # The template holds no rows but the migration version, so emptying restores it exactly.
    counts = pg_cluster.psql(
        " UNION ALL ".join(f"SELECT count(*) FROM {t}" for t in tables), dbname=name
    ).split()
    assert set(counts) == {"0"}, dict(zip(tables, counts, strict=True))
    return pg_cluster, name, f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path) -> str:
    if request.param == "sqlite":
        return copy_sqlite(sqlite_template, tmp_path)
    cluster, name, truncate = request.getfixturevalue("pg_reused")
    cluster.psql(truncate, dbname=name)
    return str(cluster.url(name))

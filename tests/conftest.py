"""Fixtures: a real mock upstream, the ledger on SQLite and on a real PostgreSQL (throwaway
cluster, schema from the Alembic migrations), and the gateway app with an injected clock."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.clock import ManualClock
from app.config import Settings
from app.main import create_app
from app.migrate import upgrade_to_head
from app.mock_upstream import create_mock_app
from tests.pgcluster import PgCluster, find_pg_bindir
from tests.servers import ServerThread

DATA = Path(__file__).parent / "data"
PRICES = str(DATA / "prices.yaml")
ADMIN_KEY = "test-admin-key-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-credential-42"
START = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def mock_upstream() -> Iterator[ServerThread]:
    server = ServerThread(create_mock_app()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    if find_pg_bindir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are required in CI")
        pytest.skip("no PostgreSQL server binaries installed (CI installs them: .ci/run)")
    cluster = PgCluster()
    cluster.start()
    # One migrated template; each test gets a fresh copy (CREATE DATABASE ... TEMPLATE).
    url = cluster.create_database("bg_template")
    upgrade_to_head(url)
    yield cluster
    cluster.cleanup()


def _fresh_pg_database(cluster: PgCluster) -> str:
    name = f"bg_{uuid.uuid4().hex[:12]}"
    cluster.psql(f"CREATE DATABASE {name} TEMPLATE bg_template")
    return cluster.url(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite ledger migrated once per session; each test gets a copy of the file."""
    path = tmp_path_factory.mktemp("bg-sqlite-template") / "template.db"
    upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    leftovers = [p for p in path.parent.iterdir() if p != path]
    assert not leftovers, leftovers  # no -wal/-shm: the file alone is the whole database
    return path


def copy_sqlite(template: Path, directory: Path) -> str:
    """A fresh SQLite ledger at the latest migration in `directory`: a copy of the template."""
    target = directory / "ledger.db"
    shutil.copyfile(template, target)
    return f"sqlite+aiosqlite:///{target}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ledger database, at the latest migration: each test runs on both."""
    if request.param == "sqlite":
        return copy_sqlite(request.getfixturevalue("sqlite_template"), tmp_path)
    return _fresh_pg_database(request.getfixturevalue("pg_cluster"))


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    return copy_sqlite(sqlite_template, tmp_path)


@pytest.fixture
def postgres_url(pg_cluster: PgCluster) -> str:
    return _fresh_pg_database(pg_cluster)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def make_settings(database_url: str, upstream_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "upstream_url": upstream_url,
        "admin_key": ADMIN_KEY,
        "upstream_api_key": UPSTREAM_KEY,
        "prices_file": PRICES,
        "log_format": "text",
        "db_pool_size": 5,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class Gateway:
    """The app under test, its settings, clock, an HTTP client and an admin client."""

    def __init__(
        self, app: object, settings: Settings, clock: ManualClock, client: httpx.AsyncClient
    ) -> None:
        self.app = app
        self.settings = settings
        self.clock = clock
        self.client = client

    @property
    def state(self):  # noqa: ANN201
        return self.app.state  # type: ignore[attr-defined]

    async def admin(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        return await self.client.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]

    async def create_key(self, **body: object) -> dict:
        r = await self.admin("POST", "/admin/keys", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    async def chat(
        self, key: str, model: str = "bg-test", max_tokens: int | None = 10, **extra: object
    ) -> httpx.Response:
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": "user", "content": "hello there"}],
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        body.update(extra)
        return await self.client.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )


@pytest.fixture
async def gateway(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> AsyncIterator[Gateway]:
    async with running_gateway(make_settings(database_url, mock_upstream.url), clock) as gw:
        yield gw


@asynccontextmanager
async def running_gateway(settings: Settings, clock: ManualClock) -> AsyncIterator[Gateway]:
    app = create_app(settings, clock, run_scheduler=False, migrate=False)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway", timeout=30
        ) as client:
            yield Gateway(app, settings, clock, client)
    await asyncio.sleep(0)

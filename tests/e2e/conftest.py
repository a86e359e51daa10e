"""End-to-end fixtures: the gateway served by a REAL uvicorn server (httpx's ASGITransport
buffers whole responses, so streaming and disconnects need a real socket), in front of the
real mock upstream, with the ledger on SQLite or PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.clock import SystemClock
from app.main import create_app
from app.migrate import upgrade_to_head
from tests.conftest import ADMIN_KEY, _fresh_pg_database, make_settings
from tests.servers import ServerThread


def exact(response: httpx.Response) -> Any:
    """JSON with numbers as Decimal, so money compares exactly."""
    return json.loads(response.text, parse_float=Decimal)


class LiveGateway:
    """A gateway on a real port, plus a synchronous admin client."""

    def __init__(self, server: ServerThread, settings: Any) -> None:
        self.server = server
        self.settings = settings
        self.url = server.url
        self.http = httpx.Client(base_url=server.url, timeout=30)

    def close(self) -> None:
        self.http.close()
        self.server.stop()

    # -- admin -----------------------------------------------------------------------------

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        return self.http.request(method, path, headers=headers, **kwargs)

    def create_key(self, max_budget: float = 10.0, **body: Any) -> dict[str, Any]:
        body = {"alias": "e2e", "max_budget": max_budget, "budget_duration": "1mo", **body}
        r = self.admin("POST", "/admin/keys", json=body)
        assert r.status_code == 201, r.text
        return r.json()

    def key(self, key_id: str) -> dict[str, Any]:
        r = self.admin("GET", f"/admin/keys/{key_id}")
        assert r.status_code == 200, r.text
        return exact(r)

    def ledger(self, key_id: str) -> list[dict[str, Any]]:
        r = self.admin("GET", "/admin/ledger", params={"key_id": key_id, "limit": 1000})
        assert r.status_code == 200, r.text
        return exact(r)["data"]

    def wait_ledger(self, key_id: str, count: int = 1, deadline: float = 10.0) -> list[dict]:
        """Polls until the key has `count` ledger entries (fails after `deadline` seconds),
        then checks a moment later that no extra entry shows up."""
        end = time.monotonic() + deadline
        while True:
            entries = self.ledger(key_id)
            if len(entries) >= count:
                break
            if time.monotonic() > end:
                pytest.fail(
                    f"expected {count} ledger entries within {deadline}s, got {len(entries)}"
                )
            time.sleep(0.02)
        time.sleep(0.05)
        entries = self.ledger(key_id)
        assert len(entries) == count, entries
        return entries

    def assert_settled(self, key_id: str) -> dict[str, Any]:
        """No reservation left, and the key's spend is exactly the sum of its entries."""
        key = self.key(key_id)
        assert key["reserved"] == 0, key
        total = sum((e["cost"] for e in self.ledger(key_id)), Decimal(0))
        assert key["spend"] == total, (key, total)
        return key


def start_live(database_url: str, upstream_url: str, **overrides: Any) -> LiveGateway:
    settings = make_settings(database_url, upstream_url, **overrides)
    app = create_app(settings, SystemClock(), run_scheduler=False, migrate=False)
    return LiveGateway(ServerThread(app).start(), settings)


def _sqlite(tmp: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp / 'ledger.db'}"
    upgrade_to_head(url)
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def live(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mock_upstream: ServerThread,
) -> Iterator[LiveGateway]:
    """One real gateway per database for the session; tests isolate themselves by key."""
    if request.param == "sqlite":
        url = _sqlite(tmp_path_factory.mktemp("e2e-sqlite"))
    else:
        url = _fresh_pg_database(request.getfixturevalue("pg_cluster"))
    gw = start_live(url, mock_upstream.url)
    yield gw
    gw.close()


@pytest.fixture(scope="session")
def live_sqlite(
    tmp_path_factory: pytest.TempPathFactory, mock_upstream: ServerThread
) -> Iterator[LiveGateway]:
    """For tests about the proxy rather than the ledger."""
    gw = start_live(_sqlite(tmp_path_factory.mktemp("e2e-sqlite1")), mock_upstream.url)
    yield gw
    gw.close()


@pytest.fixture(scope="session")
def live_factory(
    tmp_path_factory: pytest.TempPathFactory, mock_upstream: ServerThread
) -> Iterator[Callable[..., LiveGateway]]:
    """A gateway (SQLite) with settings overrides; `upstream_url` may be overridden too.
    Started once per distinct set of overrides and shared: tests isolate themselves by key."""
    started: dict[tuple, LiveGateway] = {}

    def start(**overrides: Any) -> LiveGateway:
        ident = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
        if ident not in started:
            upstream = overrides.pop("upstream_url", mock_upstream.url)
            url = _sqlite(tmp_path_factory.mktemp("e2e-gw"))
            started[ident] = start_live(url, upstream, **overrides)
        return started[ident]

    yield start
    for gw in started.values():
        gw.close()

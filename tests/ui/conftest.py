"""Fixtures of the dashboard's browser tests: chromium, and one running gateway with a seeded
ledger (30 days of history rolled up by the scheduler, and requests spent today)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import create_engine, func, insert, select

from app.ledger.usage_rollup import day_start
from app.main import create_app
from app.migrate import upgrade_to_head
from app.mock_upstream import create_mock_app
from app.models import LedgerEntry, UsageRollupDay
from tests.conftest import ADMIN_KEY, make_settings
from tests.servers import ServerThread
from tests.ui.browser import Admin, launch

VIEWER_KEY = "viewer-key-for-the-finance-lead-77"
SEED_DAYS = 20
TTL_SECONDS = 900.0


@dataclass
class LiveGateway:
    url: str
    admin: Admin
    database: str  # a sync SQLAlchemy URL of its SQLite ledger
    keys: list[dict[str, Any]]


@pytest.fixture(scope="module")
def browser(live_gateway: LiveGateway) -> Iterator[Any]:
    """Module-scoped, and started after the gateway: Playwright's sync API keeps an event loop
    marked as running in this thread while it lives, where asyncio.run (the migrations, the
    async tests of other modules) cannot run."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield from launch(playwright)


def seed_history(database: str, key_ids: list[str], now: datetime) -> None:
    """SEED_DAYS days of entries before today: several models, a few 429s and overruns."""
    rows = []
    today = day_start(now.date())
    models = ["gpt-4o-mini", "gpt-4o", "claude-sonnet", None]
    for d in range(1, SEED_DAYS + 1):
        day = today - timedelta(days=d)
        for i in range(6):
            n = d * 6 + i
            at = day + timedelta(hours=3 * i, minutes=n % 60)
            rejected = n % 9 == 0
            rows.append(
                {
                    "request_id": f"req_history_{n:05d}",
                    "key_id": key_ids[n % len(key_ids)],
                    "model": models[n % len(models)],
                    "endpoint": "/v1/chat/completions",
                    "stream": n % 2 == 0,
                    "prompt_tokens": 100 + n,
                    "completion_tokens": 0 if rejected else 50 + n,
                    "cost": 0 if rejected else 137_000_000 + 7_654_321 * n,
                    "overrun": 2_000_000 if n % 13 == 0 and not rejected else 0,
                    "cost_source": "none" if rejected else "prices",
                    "outcome": "rejected" if rejected else "ok",
                    "status_code": 429 if rejected else 200,
                    "started_at": at,
                    "finished_at": at,
                }
            )
    engine = create_engine(database)
    with engine.begin() as conn:
        conn.execute(insert(LedgerEntry.__table__), rows)
    engine.dispose()


def last_final_day(now: datetime) -> Any:
    """The last day the scheduler's rollup takes (app.scheduler.run_usage_rollup's grace)."""
    grace = timedelta(seconds=TTL_SECONDS) + timedelta(hours=1)
    day = now.date() - timedelta(days=1)
    while day_start(day + timedelta(days=1)) + grace > now:
        day -= timedelta(days=1)
    return day


def wait_for_rollup(database: str, through: Any) -> None:
    engine = create_engine(database)
    deadline = time.monotonic() + 60
    try:
        while True:
            with engine.connect() as conn:
                last = conn.execute(select(func.max(UsageRollupDay.day))).scalar()
            if last is not None and str(last) >= through.isoformat():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the scheduler did not roll up through {through} (at {last})")
            time.sleep(0.1)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    workdir: Path = tmp_path_factory.mktemp("ui-gateway")
    url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
    upgrade_to_head(url)
    mock = ServerThread(create_mock_app()).start()
    settings = make_settings(
        url,
        mock.url,
        viewer_key=VIEWER_KEY,
        reset_interval_seconds=0.5,
        reservation_ttl_seconds=TTL_SECONDS,
    )
    gateway = ServerThread(create_app(settings, run_scheduler=True, migrate=False)).start()
    admin = Admin(gateway.url, ADMIN_KEY)
    try:
        keys = [
            admin.post(
                "/admin/keys", {"alias": alias, "max_budget": limit, "budget_duration": "1mo"}
            )
            for alias, limit in (("search-team", 50), ("finance-bot", 0.1), ("data-science", None))
        ]
        database = f"sqlite:///{workdir / 'ledger.db'}"
        now = datetime.now(UTC)
        seed_history(database, [k["id"] for k in keys], now)
        # Today's requests, through the proxy with the openai SDK: finance-bot hits its limit.
        for k, requests in zip(keys, (4, 12, 3), strict=True):
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=k["key"], max_retries=0)
            for _ in range(requests):
                try:
                    client.chat.completions.create(
                        model="bg-test",
                        max_tokens=20,
                        messages=[{"role": "user", "content": "hello"}],
                    )
                except openai.RateLimitError:
                    pass
            client.close()
        wait_for_rollup(database, last_final_day(now))
        yield LiveGateway(gateway.url, admin, database, keys)
    finally:
        admin.close()
        gateway.stop()
        mock.stop()

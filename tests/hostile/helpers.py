"""Shared assertions for the hostile-input tests (not a test module)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import func, inspect, select, text

from app.ledger.repository import reconcile
from app.models.ledger_entry import LedgerEntry
from app.models.reservation import Reservation
from tests.conftest import Gateway
from tests.keys.helpers import ERROR_KEYS, key_object, upstream_requests

METERED = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages",
)
# A valid body per endpoint (each is admitted and answered 200: test_proxy_bodies checks it, so
# that every rejection in the hostile tests is caused by the one thing a case changes).
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "bg-test",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    },
    "/v1/completions": {"model": "bg-test", "prompt": "hi", "max_tokens": 5},
    "/v1/responses": {"model": "bg-test", "input": "hi", "max_output_tokens": 5},
    "/v1/embeddings": {"model": "bg-test", "input": "hi"},
    "/v1/messages": {
        "model": "bg-test",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}],
    },
}


def dumps(body: Any) -> bytes:
    # json (not orjson): integers beyond 64 bits are written as the digits a client sends.
    return json.dumps(body).encode()


TABLES = {"api_keys", "budgets", "budget_periods", "ledger_entries", "ledger_charges"}


def is_openai_error(r: httpx.Response) -> bool:
    """The body is exactly {"error": {"message", "type", "code", "param"}} (nothing else)."""
    if not r.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = r.json()
    except ValueError:
        return False
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    return (
        isinstance(err, dict)
        and set(err) == ERROR_KEYS
        and isinstance(err["message"], str)
        and bool(err["message"])
        and isinstance(err["type"], str)
        and (err["code"] is None or isinstance(err["code"], str))
        and (err["param"] is None or isinstance(err["param"], str))
        and "Traceback" not in r.text
    )


def assert_client_error(r: httpx.Response, *statuses: int) -> dict[str, Any]:
    """A 4xx (one of `statuses` when given) with an OpenAI error body; never a 5xx."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert is_openai_error(r), (r.status_code, r.headers, r.text[:500])
    return r.json()["error"]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LedgerState:
    spend: float
    reserved: float
    reservations: int
    entries: int
    upstream: int


async def ledger_state(gw: Gateway, key_id: str, upstream_url: str) -> LedgerState:
    """What rejected input must leave unchanged: the key's spend and reserved (API), the open
    reservations and ledger entries (database), and what the upstream saw."""
    key = await key_object(gw, key_id)
    async with gw.state.engine.connect() as conn:
        reservations = (
            await conn.execute(select(func.count()).select_from(Reservation.__table__))
        ).scalar_one()
        entries = (
            await conn.execute(select(func.count()).select_from(LedgerEntry.__table__))
        ).scalar_one()
        await conn.rollback()
    return LedgerState(
        key["spend"], key["reserved"], reservations, entries, await upstream_requests(upstream_url)
    )


async def assert_reconciled(gw: Gateway) -> None:
    report = await reconcile(gw.state.engine)
    assert report.ok, report.problems


async def table_names(gw: Gateway) -> set[str]:
    async with gw.state.engine.connect() as conn:
        names = await conn.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        await conn.rollback()
    return names


async def count_rows(gw: Gateway, table: str) -> int:
    assert table in TABLES
    async with gw.state.engine.connect() as conn:
        n = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
        await conn.rollback()
    return int(n)

"""GET /admin/usage by scope (SPEC 11): team, user and end user from the ledger entries'
columns, tags from their tag list (an entry with two tags counts in both). The entries are
written directly: the request path that fills these columns is tested with it."""

from __future__ import annotations

from sqlalchemy import insert

from app.models import LedgerEntry
from tests.conftest import START, Gateway

NANO = 1_000_000_000


async def seed(gw: Gateway, key_id: str) -> None:
    rows = [
        # (team, user, end user, tags, cost in cents)
        ("team_a", "user_1", "eu_1", ["prod", "batch"], 1),
        ("team_a", "user_2", "eu_1", ["prod"], 2),
        ("team_b", "user_1", None, None, 4),
        (None, None, "eu_2", ["batch"], 8),
    ]
    values = [
        {
            "request_id": f"req_{i}",
            "key_id": key_id,
            "team_id": team,
            "user_id": user,
            "end_user_id": end_user,
            "tags": tags,
            "model": "bg-test",
            "endpoint": "/v1/chat/completions",
            "stream": False,
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "cost": cents * NANO // 100,
            "cost_source": "prices",
            "outcome": "ok",
            "status_code": 200,
            "started_at": START,
            "finished_at": START,
        }
        for i, (team, user, end_user, tags, cents) in enumerate(rows)
    ]
    async with gw.state.engine.begin() as conn:
        await conn.execute(insert(LedgerEntry.__table__), values)


async def report(gw: Gateway, group_by: str) -> tuple[dict[str | None, float], float]:
    r = await gw.admin("GET", "/admin/usage", params={"group_by": group_by})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["group_by"] == group_by
    return {row[group_by]: row["spend"] for row in body["data"]}, body["total_spend"]


async def test_usage_by_team_user_end_user_and_tag(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="k")
    await seed(gateway, key["id"])
    assert await report(gateway, "team") == ({None: 0.08, "team_a": 0.03, "team_b": 0.04}, 0.15)
    assert await report(gateway, "user") == ({None: 0.08, "user_1": 0.05, "user_2": 0.02}, 0.15)
    assert await report(gateway, "end_user") == ({None: 0.04, "eu_1": 0.03, "eu_2": 0.08}, 0.15)
    # Two tags: counted in both groups; the total counts each entry once.
    assert await report(gateway, "tag") == ({None: 0.04, "batch": 0.09, "prod": 0.03}, 0.15)
    by_key, total = await report(gateway, "key")
    assert by_key == {key["id"]: 0.15} and total == 0.15

    r = await gateway.admin("GET", "/admin/usage", params={"group_by": "tag"})
    prod = next(row for row in r.json()["data"] if row["tag"] == "prod")
    assert prod["requests"] == 2 and prod["prompt_tokens"] == 20

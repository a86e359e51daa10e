"""Non-metered forwarding (SPEC 3, 9): a route the operator opts in (BUDGETGATE_EXTRA_ROUTES)
reaches the upstream intact, under /v1 and without, is checked against the key's budgets and
leaves one ledger entry charged the upstream's reported cost; any other path is a 404 and
never forwarded; GET /v1/models is free, always allowed and leaves none."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.clock import ManualClock
from tests.conftest import UPSTREAM_KEY, Gateway, make_settings, running_gateway
from tests.keys.helpers import (
    assert_openai_error,
    bearer,
    key_object,
    ledger,
    mock_stats,
    upstream_requests,
)
from tests.servers import ServerThread

EXTRA_ROUTES = ", ".join(
    [f"{m} /v1/files/{{id}}/content" for m in ("POST", "PUT", "PATCH", "DELETE", "GET")]
    + ["POST /v1/batches", "GET /v1/files", "DELETE /v1/files/{id}"]
)


@pytest.fixture
async def extra_gateway(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> AsyncIterator[Gateway]:
    settings = make_settings(database_url, mock_upstream.url, extra_routes=EXTRA_ROUTES)
    async with running_gateway(settings, clock) as gw:
        yield gw


BODY = b'{"purpose": "batch", "note": "caf\xc3\xa9 \\u00e9", "n": [1, 2.5, null]}'


async def test_extra_routes_forwarded_intact_and_recorded(
    extra_gateway: Gateway, mock_upstream: ServerThread
) -> None:
    gateway = extra_gateway
    key = await gateway.create_key(alias="fwd", max_budget=1.0, budget_duration="1mo")
    request_ids = []
    for prefix in ("/v1", ""):
        for method in ("POST", "PUT", "PATCH", "DELETE", "GET"):
            path = f"{prefix}/files/file-abc/content"
            query = "x=1&y=two%20words&x=3&empty="
            body = BODY if method != "GET" else b""
            r = await gateway.client.request(
                method,
                f"{path}?{query}",
                content=body,
                headers={
                    **bearer(key["key"]),
                    "content-type": "application/x-custom",
                    "x-custom-header": "value-1",
                    "accept": "application/json",
                },
            )
            assert r.status_code == 200, (method, path, r.text)
            echo = r.json()
            assert echo["method"] == method
            assert echo["path"] == path
            assert echo["query"] == query
            assert echo["body"].encode() == body
            sent = echo["headers"]
            assert sent["x-custom-header"] == "value-1"
            assert sent["accept"] == "application/json"
            if body:
                assert sent["content-type"] == "application/x-custom"
                assert sent["content-length"] == str(len(body))
            assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}"
            assert sent["x-request-id"] == r.headers["x-request-id"]
            # Budget headers on forwarded responses too.
            assert r.headers["x-budget-max-budget"] == "1.0"
            assert r.headers["x-budget-reset-at"] == "2026-02-01T00:00:00Z"
            request_ids.append(r.headers["x-request-id"])

    entries = await ledger(gateway, key["id"])
    assert {e["request_id"] for e in entries} == set(request_ids)
    assert len(entries) == 10
    for e in entries:
        assert e["endpoint"] == "/files/file-abc/content"
        assert (e["outcome"], e["cost"], e["model"], e["stream"]) == ("ok", 0, None, False)
        assert e["cost_source"] == "unbounded"
    got = await key_object(gateway, key["id"])
    assert (got["spend"], got["reserved"]) == (0, 0)


async def test_upstream_admin_routes_are_not_reachable_through_the_gateway(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """LiteLLM's own management routes must not be reachable with the gateway's upstream
    credential (the master key)."""
    key = await gateway.create_key(max_budget=1.0)
    before = await upstream_requests(mock_upstream.url)
    for method, path in (
        ("POST", "/key/generate"),
        ("POST", "/config/update"),
        ("GET", "/spend/logs"),
        ("GET", "/health"),
        ("POST", "/user/new"),
    ):
        r = await gateway.client.request(method, path, json={}, headers=bearer(key["key"]))
        assert r.status_code in (404, 405), (path, r.status_code, r.text)
        assert "error" in r.json()
    assert await upstream_requests(mock_upstream.url) == before
    assert await ledger(gateway, key["id"]) == []


async def test_upstream_reported_cost_is_charged_on_extra_routes(
    extra_gateway: Gateway, mock_upstream: ServerThread
) -> None:
    gateway = extra_gateway
    key = await gateway.create_key(max_budget=1.0)
    for path in ("/v1/batches", "/batches"):
        r = await gateway.client.post(
            path, content=b"{}", headers={**bearer(key["key"]), "x-mock-cost": "0.0123"}
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-litellm-response-cost"] == "0.0123"
    entries = await ledger(gateway, key["id"])
    assert [(e["cost"], e["cost_source"], e["endpoint"]) for e in entries] == [
        (0.0123, "unbounded", "/batches")
    ] * 2
    got = await key_object(gateway, key["id"])
    assert (got["spend"], got["reserved"]) == (0.0246, 0)


async def test_unlisted_paths_are_not_forwarded(
    extra_gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """A path neither in the route table nor opted in is a 404, for a live key: not
    forwarded, not recorded; a refused route's 404 says how to opt it in."""
    key = await extra_gateway.create_key(max_budget=1.0)
    before = await upstream_requests(mock_upstream.url)
    for method, path in [
        ("POST", "/v1/some/other/path?x=1"),
        ("GET", "/v1/batches"),
        ("POST", "/v1/files"),
        ("POST", "/v1/audio/transcriptions"),
        ("GET", "/v1/chat/completions"),
    ]:
        r = await extra_gateway.client.request(
            method, path, content=b"{}" if method == "POST" else b"", headers=bearer(key["key"])
        )
        assert_openai_error(r, 404, type="not_found_error", code="route_not_found")
        assert r.headers["x-budget-max-budget"] == "1.0"  # authenticated: budget headers too
    r = await extra_gateway.client.post("/v1/audio/transcriptions", headers=bearer(key["key"]))
    assert "BUDGETGATE_EXTRA_ROUTES" in r.json()["error"]["message"]
    assert await upstream_requests(mock_upstream.url) == before
    assert await ledger(extra_gateway, key["id"]) == []


async def test_exhausted_key_blocked_on_every_route_but_models_free(
    extra_gateway: Gateway, mock_upstream: ServerThread
) -> None:
    gateway = extra_gateway
    zero = await gateway.create_key(alias="zero", max_budget=0)
    spent = await gateway.create_key(alias="spent", max_budget=0.01, budget_duration="1d")
    assert (await gateway.chat(spent["key"], max_tokens=10)).status_code == 200
    gateway.clock.advance(1)

    for key in (zero, spent):
        before = await upstream_requests(mock_upstream.url)
        for method, path in [
            ("POST", "/batches?x=1"),
            ("GET", "/v1/files"),
            ("DELETE", "/v1/files/file-1"),
            ("GET", "/files"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/chat/completions"),
        ]:
            body = b'{"model": "bg-test", "max_tokens": 1, "messages": []}'
            r = await gateway.client.request(
                method, path, content=body if method == "POST" else b"", headers=bearer(key["key"])
            )
            assert_openai_error(r, 429, type="budget_exceeded", code="budget_exceeded")
        assert await upstream_requests(mock_upstream.url) == before
        rejected = [e for e in await ledger(gateway, key["id"]) if e["outcome"] == "rejected"]
        assert len(rejected) == 6
        assert {e["endpoint"] for e in rejected} == {
            "/batches",
            "/files",
            "/files/file-1",
            "/chat/completions",
        }
        entries_before = len(await ledger(gateway, key["id"]))

        # GET /v1/models (and /models) is free and always allowed: forwarded, no entry.
        for path in ("/v1/models", "/models"):
            r = await gateway.client.get(path, headers={"x-api-key": key["key"]})
            assert r.status_code == 200, r.text
            assert r.json()["object"] == "list"
            stats = await mock_stats(mock_upstream.url)
            assert stats["last_headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
            assert "x-api-key" not in stats["last_headers"]
            assert stats["last_headers"]["x-request-id"] == r.headers["x-request-id"]
            # Authenticated: the budget headers too (SPEC 3), showing the exhausted budget.
            assert r.headers["x-budget-remaining"] == "0.0", r.headers
            assert r.headers["x-budget-spend"] == r.headers["x-budget-max-budget"]
        # So is retrieving one model (the mock echoes the request it got).
        r = await gateway.client.get("/v1/models/bg-test", headers=bearer(key["key"]))
        assert r.status_code == 200 and r.json()["path"] == "/v1/models/bg-test", r.text
        assert r.headers["x-budget-remaining"] == "0.0"
        assert await upstream_requests(mock_upstream.url) == before + 3
        assert len(await ledger(gateway, key["id"])) == entries_before
        got = await key_object(gateway, key["id"])
        assert got["reserved"] == 0


async def test_models_on_a_live_key_writes_no_entry_and_costs_nothing(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1.0)
    for _ in range(3):
        r = await gateway.client.get(
            "/v1/models", headers={**bearer(key["key"]), "x-mock-cost": "0.5"}
        )
        assert r.status_code == 200
        assert [m["id"] for m in r.json()["data"]]
    assert await ledger(gateway, key["id"]) == []
    got = await key_object(gateway, key["id"])
    assert (got["spend"], got["reserved"]) == (0, 0)


async def test_metered_paths_without_v1_prefix(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1.0)
    r = await gateway.client.post(
        "/chat/completions",
        json={
            "model": "bg-test",
            "messages": [{"role": "user", "content": "a b c"}],
            "max_tokens": 4,
        },
        headers=bearer(key["key"]),
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-budget-spend"] == "0.004"
    r = await gateway.client.post(
        "/embeddings",
        json={"model": "bg-priced", "input": "one two three"},
        headers=bearer(key["key"]),
    )
    assert r.status_code == 200, r.text
    entries = await ledger(gateway, key["id"])
    assert sorted((e["endpoint"], e["cost"]) for e in entries) == [
        ("/chat/completions", 0.004),
        ("/embeddings", 0.0003),  # 3 input tokens x $100/M
    ]


async def test_a_key_limited_to_some_models_sees_only_those(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """The upstream lists every model its credential reaches (in managed mode, the gateway's):
    a key with an allow-list sees only its models, and asking for another is a 403."""
    everything = await gateway.create_key(max_budget=1.0)
    r = await gateway.client.get("/v1/models", headers=bearer(everything["key"]))
    listed = [m["id"] for m in r.json()["data"]]
    assert "gpt-4o-mini" in listed and "gpt-4o" in listed and len(listed) > 2

    limited = await gateway.create_key(max_budget=1.0, models=["gpt-4o-mini", "not-upstream"])
    r = await gateway.client.get("/v1/models", headers=bearer(limited["key"]))
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == ["gpt-4o-mini"]
    assert r.json()["object"] == "list"
    r = await gateway.client.get("/v1/models/gpt-4o-mini", headers=bearer(limited["key"]))
    assert r.status_code == 200, r.text
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.client.get("/v1/models/gpt-4o", headers=bearer(limited["key"]))
    assert_openai_error(r, 403, code="model_not_allowed")
    assert await upstream_requests(mock_upstream.url) == before

"""Issue 13's budget breakers: a fake upstream that bills like a provider at its worst
(tests/e2e/budget_breaker.py), behind the real gateway on SQLite and PostgreSQL, prices from
usage (no upstream cost header). For each way a request can cost more than it seems to, 20
concurrent requests against a small budget: the spend never passes max_budget."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from app.pricing.cost import CostCalculator
from app.pricing.prices import PriceBook
from app.pricing.usage import Usage
from tests.conftest import _fresh_pg_database
from tests.e2e.budget_breaker import STORED_CONTEXT, create_breaker_app
from tests.e2e.conftest import LiveGateway, _sqlite, start_live
from tests.servers import ServerThread

PRICES = str(Path(__file__).parent.parent / "data" / "breaker-prices.yaml")
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/i.png", "detail": "high"}}
PDF = {"type": "file", "file": {"file_url": "https://example.com/report.pdf"}}


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


# (path, body, max_budget in dollars: room for a few such requests at most)
VECTORS: dict[str, tuple[str, dict[str, Any], float]] = {
    "n=8": (
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": user("hi"), "n": 8, "max_tokens": 1000},
        0.01,
    ),
    "best_of=20": (
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": "hi", "best_of": 20, "max_tokens": 100},
        0.01,
    ),
    "2048 prompts": (
        "/v1/completions",
        {"model": "gpt-3.5-turbo-instruct", "prompt": ["hi"] * 2048, "max_tokens": 16},
        0.2,
    ),
    "ten high-detail images": (
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": user([{"type": "text", "text": "what?"}, *[IMAGE] * 10]),
            "max_tokens": 100,
        },
        0.05,
    ),
    "PDF by URL": (
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": user([PDF]), "max_tokens": 100},
        0.05,
    ),
    "previous_response_id": (
        "/v1/responses",
        {
            "model": "gpt-4o-mini",
            "input": "and then?",
            "previous_response_id": "resp_stored",
            "max_output_tokens": 100,
        },
        0.05,
    ),
    "web search": (
        "/v1/responses",
        {
            "model": "gpt-4o-mini",
            "input": "news?",
            "tools": [{"type": "web_search"}],
            "max_output_tokens": 100,
        },
        1.0,
    ),
    "anthropic web search": (
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5",
            "messages": user("news?"),
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}],
            "max_tokens": 100,
        },
        20.0,
    ),
    "audio output": (
        "/v1/chat/completions",
        {
            "model": "gpt-audio",
            "messages": user("sing"),
            "modalities": ["text", "audio"],
            "audio": {"voice": "alloy", "format": "wav"},
            "max_tokens": 1000,
        },
        0.2,
    ),
    "declared router": (
        "/v1/chat/completions",
        {"model": "team-router", "messages": user("hi"), "max_tokens": 1000},
        0.03,
    ),
}


# Who answers: a router's fallback to the dearer of the models it was declared with.
ANSWERED_BY = {"declared router": {"x-breaker-answer-model": "gpt-4o"}}


@pytest.fixture(scope="module")
def breaker() -> Iterator[ServerThread]:
    server = ServerThread(create_breaker_app()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, breaker: ServerThread
) -> Iterator[LiveGateway]:
    if request.param == "sqlite":
        url = _sqlite(tmp_path_factory.mktemp("breaker"))
    else:
        url = _fresh_pg_database(request.getfixturevalue("pg_cluster"))
    gw = start_live(url, breaker.url, prices_file=PRICES, trust_upstream_cost=False)
    yield gw
    gw.close()


def post(gw: LiveGateway, key: dict[str, Any], path: str, body: Any, **headers: str) -> Any:
    return gw.http.post(
        path, json=body, headers={"authorization": f"Bearer {key['key']}", **headers}
    )


@pytest.mark.parametrize("vector", sorted(VECTORS))
def test_twenty_concurrent_breakers_never_pass_the_budget(
    gateway: LiveGateway, vector: str
) -> None:
    path, body, budget = VECTORS[vector]
    key = gateway.create_key(max_budget=budget)
    with ThreadPoolExecutor(20) as pool:
        headers = ANSWERED_BY.get(vector, {})
        statuses = list(
            pool.map(lambda _: post(gateway, key, path, body, **headers).status_code, range(20))
        )
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses, f"{vector}: the budget admits none; the test proves nothing"
    entries = gateway.wait_ledger(key["id"], statuses.count(200) + statuses.count(429))
    charged = [e for e in entries if e["outcome"] == "ok"]
    assert charged and all(e["cost_source"] == "prices" and e["cost"] > 0 for e in charged)
    settled = gateway.assert_settled(key["id"])
    assert settled["spend"] <= Decimal(str(budget)), (vector, settled["spend"], statuses)


def test_a_zero_output_bound_is_refused_before_forwarding(gateway: LiveGateway) -> None:
    key = gateway.create_key(max_budget=1.0)
    for path, field in [
        ("/v1/chat/completions", "max_tokens"),
        ("/v1/responses", "max_output_tokens"),
    ]:
        body = {"model": "gpt-4o-mini", "messages": user("hi"), "input": "hi", field: 0}
        r = post(gateway, key, path, body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == field
    assert gateway.assert_settled(key["id"])["spend"] == 0


def test_stored_context_is_charged_as_billed(gateway: LiveGateway) -> None:
    """A previous_response_id's 100k tokens are in the charge (usage x price), within the
    reservation."""
    path, body, _ = VECTORS["previous_response_id"]
    key = gateway.create_key(max_budget=1.0)
    r = post(gateway, key, path, body)
    assert r.status_code == 200, r.text
    [entry] = gateway.wait_ledger(key["id"], 1)
    assert entry["prompt_tokens"] > STORED_CONTEXT
    costs = CostCalculator(PriceBook.load(PRICES), "reject", False)
    expected = costs.from_usage(["gpt-4o-mini"], Usage(entry["prompt_tokens"], 100))
    assert expected is not None
    assert entry["cost"] == Decimal(expected).scaleb(-9)


def test_an_undeclared_dearer_answer_is_charged_at_its_price(gateway: LiveGateway) -> None:
    """Asked for gpt-4o-mini, answered by gpt-4o (a router's fallback nobody declared): the
    charge is gpt-4o's price of the usage, more than the reservation (an overrun, which the
    ledger records)."""
    key = gateway.create_key(max_budget=1.0)
    body = {"model": "gpt-4o-mini", "messages": user("hi"), "max_tokens": 1000}
    r = post(gateway, key, "/v1/chat/completions", body, **{"x-breaker-answer-model": "gpt-4o"})
    assert r.status_code == 200, r.text
    [entry] = gateway.wait_ledger(key["id"], 1)
    book = PriceBook.load(PRICES)
    usage = Usage(entry["prompt_tokens"], entry["completion_tokens"])
    at_gpt_4o = CostCalculator(book, "reject", False).from_usage(["gpt-4o"], usage)
    at_mini = CostCalculator(book, "reject", False).from_usage(["gpt-4o-mini"], usage)
    assert at_gpt_4o is not None and at_mini is not None and at_gpt_4o > at_mini
    assert entry["cost"] == Decimal(at_gpt_4o).scaleb(-9)

"""Through the gateway, body and stream: the charge prices the usage's own categories at their
own prices (SPEC 10): cached input at the cache-read price, web searches at their fee. Prices
are genai-prices' published ones: gpt-4o $2.5/M input, $1.25/M cached, $10/M output, $10 per
1,000 web searches; claude-sonnet-4-5 $3/M input, $0.30/M cache read, $15/M output, $10 per
1,000 web searches."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from tests.e2e.conftest import LiveGateway

CATEGORIES = {"x-mock-prompt-tokens": "1000", "x-mock-cached-tokens": "600"}
SEARCHES = {"x-mock-web-searches": "2"}
M = Decimal(1_000_000)

CASES: dict[str, tuple[str, dict[str, Any], dict[str, str], Decimal]] = {
    "chat, cached input": (
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10},
        CATEGORIES,
        (400 * Decimal("2.5") + 600 * Decimal("1.25") + 10 * 10) / M,
    ),
    "responses, cached input and web searches": (
        "/v1/responses",
        {
            "model": "gpt-4o",
            "input": "news?",
            "tools": [{"type": "web_search"}],
            "max_output_tokens": 10,
        },
        CATEGORIES | SEARCHES,
        (400 * Decimal("2.5") + 600 * Decimal("1.25") + 10 * 10) / M + Decimal("0.02"),
    ),
    "messages, cache read and web searches": (
        "/v1/messages",
        {
            "model": "claude-sonnet-4-5",
            "messages": [{"role": "user", "content": "news?"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}],
            "max_tokens": 10,
        },
        CATEGORIES | SEARCHES,
        (400 * 3 + 600 * Decimal("0.3") + 10 * 15) / M + Decimal("0.02"),
    ),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_usage_categories_are_charged_at_their_prices(
    live: LiveGateway, case: str, stream: bool
) -> None:
    path, body, headers, expected = CASES[case]
    key = live.create_key(max_budget=10.0)
    r = live.http.post(
        path,
        json={**body, "stream": stream},
        headers={"authorization": f"Bearer {key['key']}", **headers},
    )
    assert r.status_code == 200, r.text
    [entry] = live.wait_ledger(key["id"], 1)
    assert (entry["outcome"], entry["cost_source"]) == ("ok", "prices"), entry
    assert entry["cost"] == expected, (entry["cost"], expected)
    live.assert_settled(key["id"])

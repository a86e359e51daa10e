"""The money path's edges, each of which a plausible bug got past before (issue 13's surviving
mutants): the output bound written into the forwarded body, the input in the reservation, an
answer without usage, the cost header's rounding, a stream without its end marker."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from app.pricing.cost import CostCalculator
from app.pricing.money import ceil_div, nanos_to_dollars
from app.pricing.prices import PriceBook
from tests.conftest import PRICES
from tests.e2e.conftest import LiveGateway

# bg-priced: $100 per 1M input tokens (100,000 nanos a token), $1000 per 1M output.
IN_NANOS, OUT_NANOS = 100_000, 1_000_000


def auth(key: dict[str, Any], **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}", "content-type": "application/json", **headers}


def upstream_received(live: LiveGateway) -> Any:
    stats = httpx.get(f"{live.settings.upstream_url}/mock/stats", timeout=10).json()
    return stats["last_body"]


BODIES_WITHOUT_BOUND = {
    "/v1/chat/completions": (
        {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens",
    ),
    "/v1/responses": ({"model": "bg-test", "input": "hi"}, "max_output_tokens"),
    "/v1/messages": (
        {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens",
    ),
}


@pytest.mark.parametrize("path", sorted(BODIES_WITHOUT_BOUND))
def test_the_default_output_bound_is_what_the_upstream_receives(
    live_sqlite: LiveGateway, path: str
) -> None:
    body, field = BODIES_WITHOUT_BOUND[path]
    key = live_sqlite.create_key()
    r = live_sqlite.http.post(path, content=orjson.dumps(body), headers=auth(key))
    assert r.status_code == 200, r.text
    received = upstream_received(live_sqlite)
    assert received[field] == live_sqlite.settings.default_max_output_tokens, received
    # bg-test: $0.001 per output token, input free; the mock writes max_tokens tokens.
    [entry] = live_sqlite.wait_ledger(key["id"], 1)
    assert entry["completion_tokens"] == live_sqlite.settings.default_max_output_tokens


def test_the_reservation_includes_the_input_bound(live: LiveGateway) -> None:
    """10,000 bytes of input at $100/M may cost $1 + (one output token) $0.001: a budget a
    nano-dollar short of that refuses it, though it has room for the output."""
    text = "a " * 5_000
    raw = orjson.dumps(
        {"model": "bg-priced", "messages": [{"role": "user", "content": text}], "max_tokens": 1}
    )
    bound = len(raw) * IN_NANOS + 1 * OUT_NANOS
    tight = live.create_key(max_budget=float(nanos_to_dollars(bound - 1)))
    r = live.http.post("/v1/chat/completions", content=raw, headers=auth(tight))
    assert r.status_code == 429, r.text
    refused = live.key(tight["id"])
    assert (refused["spend"], refused["reserved"]) == (0, 0)
    enough = live.create_key(max_budget=float(nanos_to_dollars(bound)))
    r = live.http.post("/v1/chat/completions", content=raw, headers=auth(enough))
    assert r.status_code == 200, r.text
    live.wait_ledger(enough["id"], 1)
    live.assert_settled(enough["id"])


NO_USAGE = [
    (
        "/v1/chat/completions",
        {"model": "bg-priced", "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens",
    ),
    ("/v1/responses", {"model": "bg-priced", "input": "hi"}, "max_output_tokens"),
    (
        "/v1/messages",
        {"model": "bg-priced", "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens",
    ),
]


@pytest.mark.parametrize("path,body,field", NO_USAGE)
def test_an_answer_without_usage_is_charged_the_estimate(
    live: LiveGateway, path: str, body: dict[str, Any], field: str
) -> None:
    key = live.create_key()
    raw = orjson.dumps({**body, field: 1000})
    headers = {"x-mock-no-usage": "1", "x-mock-completion-tokens": "9"}
    r = live.http.post(path, content=raw, headers=auth(key, **headers))
    assert r.status_code == 200, r.text
    assert "usage" not in r.json()
    [entry] = live.wait_ledger(key["id"], 1)
    # The estimate: a token per four bytes forwarded and per four bytes of the answer.
    expected = ceil_div(len(raw), 4) * IN_NANOS + ceil_div(len(r.content), 4) * OUT_NANOS
    assert expected < len(raw) * IN_NANOS + 1000 * OUT_NANOS  # below the bound
    assert (entry["outcome"], entry["cost_source"]) == ("ok", "estimated")
    assert entry["cost"] == nanos_to_dollars(expected) > 0
    live.assert_settled(key["id"])


@pytest.mark.parametrize("path,body,field", NO_USAGE)
def test_an_estimate_is_never_more_than_the_request_could_cost(
    live: LiveGateway, path: str, body: dict[str, Any], field: str
) -> None:
    """One output token allowed, an answer of a few hundred bytes: the estimate from its size
    passes the bound, and the bound is what is charged (no upstream bills more)."""
    key = live.create_key()
    raw = orjson.dumps({**body, field: 1})
    r = live.http.post(path, content=raw, headers=auth(key, **{"x-mock-no-usage": "1"}))
    assert r.status_code == 200, r.text
    [entry] = live.wait_ledger(key["id"], 1)
    bound = len(raw) * IN_NANOS + 1 * OUT_NANOS
    assert ceil_div(len(r.content), 4) * OUT_NANOS > bound
    assert (entry["cost_source"], entry["cost"]) == ("estimated", nanos_to_dollars(bound))
    live.assert_settled(key["id"])


def test_the_cost_header_rounds_to_the_nearest_nano_dollar() -> None:
    costs = CostCalculator(PriceBook.load(PRICES), "reject", True)
    assert costs.from_header("3.5999999999999996e-06") == 3600
    assert costs.from_header("3.6000000000000003e-06") == 3600
    assert costs.from_header("1.0000000005e-09") == 1  # exactly half-way: to even
    assert costs.from_header("1.5000000005e-09") == 2


def test_a_float_noisy_cost_header_is_charged_to_the_nano_dollar(live: LiveGateway) -> None:
    key = live.create_key()
    body = {"model": "bg-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = live.http.post(
        "/v1/chat/completions",
        content=orjson.dumps(body),
        headers=auth(key, **{"x-mock-cost": "3.5999999999999996e-06"}),
    )
    assert r.status_code == 200, r.text
    [entry] = live.wait_ledger(key["id"], 1)
    assert (entry["cost"], entry["cost_source"]) == (Decimal("0.0000036"), "upstream")


STREAMS = {
    "/v1/chat/completions": {
        "model": "bg-test",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    },
    "/v1/completions": {"model": "bg-test", "prompt": "hi", "max_tokens": 3, "stream": True},
    "/v1/responses": {"model": "bg-test", "input": "hi", "max_output_tokens": 3, "stream": True},
    "/v1/messages": {
        "model": "bg-test",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    },
}


@pytest.mark.parametrize("path", sorted(STREAMS))
def test_a_stream_without_its_end_marker_is_an_error(live: LiveGateway, path: str) -> None:
    key = live.create_key()
    with live.http.stream(
        "POST",
        path,
        content=orjson.dumps(STREAMS[path]),
        headers=auth(key, **{"x-mock-no-terminal": "1"}),
    ) as r:
        assert r.status_code == 200
        text = r.read().decode()
    for marker in ("data: [DONE]", "response.completed", "message_stop"):
        assert marker not in text  # the upstream really left it out
    assert "event: error" in text and "upstream_stream_incomplete" in text, text[-500:]
    [entry] = live.wait_ledger(key["id"], 1)
    assert entry["outcome"] == "upstream_error", entry
    live.assert_settled(key["id"])

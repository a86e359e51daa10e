"""budgetgate in front of a real LiteLLM proxy (SPEC 3-4): what LiteLLM reports is what is charged.

LiteLLM routes `gpt-4o-mini` to the project's mock upstream, which answers with exactly
`max_tokens` completion tokens and one prompt token per word, so every cost here is exact.
gpt-4o-mini costs $0.15 / $0.60 per million input / output tokens in both LiteLLM's bundled
cost map and genai-prices (checked below through LiteLLM's own cost header).

Run with `make test-litellm`; without BUDGETGATE_LITELLM_BIN every test here is skipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Any

import httpx
import openai
import pytest
from genai_prices import Usage, calc_price
from openai.types.chat import ChatCompletionMessageParam

from tests.litellm.conftest import MODEL, BudgetGate, nanos
from tests.servers import ServerThread

COST_HEADER = "x-litellm-response-cost"

# (prompt words = prompt tokens, max_tokens = completion tokens). For (4, 5) LiteLLM's float
# arithmetic gives 3.6000000000000003e-06 (just above the exact $0.0000036), for (3, 7)
# 4.6499999999999995e-06 (just below the exact $0.00000465).
TOKENS = [(3, 7), (4, 5)]


def messages(words: int) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": " ".join(f"word{i}" for i in range(words))}]


def genai_cost(prompt_tokens: int, completion_tokens: int) -> Decimal:
    """Usage x the genai-prices price, in nano-dollars (what SPEC 4 step 2 charges)."""
    price = calc_price(
        Usage(input_tokens=prompt_tokens, output_tokens=completion_tokens),
        model_ref=MODEL,
        provider_id="openai",
    )
    return price.total_price.scaleb(9).to_integral_value(ROUND_CEILING)


def header_cost(value: str) -> Decimal:
    """The header's dollars in nano-dollars, to the nearest whole nano-dollar (the ledger's
    unit; LiteLLM's float noise such as 3.6000000000000003e-06 is not charged)."""
    return nanos(value).to_integral_value(ROUND_HALF_EVEN)


def stream_to_end(client: openai.OpenAI, **kwargs: Any) -> tuple[Mapping[str, str], list[Any]]:
    """A streamed chat completion read to the end of the body (past `data: [DONE]`): its
    headers and its chunks as JSON. (The SDK's own Stream stops reading at [DONE] and closes
    the connection; see test_sdk_streams_closed_at_done_are_charged_from_usage.)"""
    with client.chat.completions.with_streaming_response.create(stream=True, **kwargs) as resp:
        headers = resp.headers
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in resp.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    return headers, chunks


def only_entry(gate: BudgetGate, key_id: str) -> dict[str, Any]:
    entries = gate.ledger(key_id)
    assert len(entries) == 1, entries
    return entries[0]


def new_key(gate: BudgetGate, max_budget: float = 1.0) -> dict[str, Any]:
    return gate.create_key(alias="litellm-it", max_budget=max_budget, budget_duration="1mo")


@pytest.mark.parametrize(("words", "max_tokens"), TOKENS)
def test_non_streamed_request_is_charged_litellm_response_cost(
    budgetgate: BudgetGate, words: int, max_tokens: int
) -> None:
    key = new_key(budgetgate)
    client = budgetgate.client(key["key"])

    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(words), max_tokens=max_tokens
    )
    completion = raw.parse()
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        words,
        max_tokens,
    )
    header = raw.headers.get(COST_HEADER)
    assert header is not None, f"LiteLLM sent no {COST_HEADER}: {dict(raw.headers)}"
    # LiteLLM's own price agrees with genai-prices' (to float precision): same model, same usage.
    exact = genai_cost(words, max_tokens)
    assert abs(nanos(header) - exact) < Decimal("1e-6"), (header, exact)

    entry = only_entry(budgetgate, key["id"])
    assert entry["cost_source"] == "upstream"
    assert entry["outcome"] == "ok"
    assert entry["stream"] is False
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (words, max_tokens)
    assert nanos(entry["cost"]) == header_cost(header), (entry["cost"], header)
    # The key's spend is that one charge, and the response said so.
    assert nanos(budgetgate.key(key["id"])["spend"]) == header_cost(header)
    assert nanos(raw.headers["x-budget-spend"]) == header_cost(header)


@pytest.mark.parametrize(("words", "max_tokens"), TOKENS)
@pytest.mark.parametrize("client_wants_usage", [False, True])
def test_streamed_request_is_priced_from_the_usage_chunk(
    budgetgate: BudgetGate, words: int, max_tokens: int, client_wants_usage: bool
) -> None:
    key = new_key(budgetgate)
    client = budgetgate.client(key["key"])
    extra: dict[str, Any] = (
        {"stream_options": {"include_usage": True}} if client_wants_usage else {}
    )

    headers, chunks = stream_to_end(
        client, model=MODEL, messages=messages(words), max_tokens=max_tokens, **extra
    )
    # LiteLLM sends no cost header on a stream (its x-litellm-response-cost-* siblings say 0.0),
    # though its other headers come through.
    assert "x-litellm-call-id" in headers
    assert COST_HEADER not in headers
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices")
    )
    assert text == " ".join(f"tok{i}" for i in range(max_tokens))
    if client_wants_usage:
        # LiteLLM forwarded stream_options.include_usage upstream: these are the mock's counts
        # (one token per word), not a local tokenizer's.
        usages = [c["usage"] for c in chunks if c.get("usage")]
        assert [(u["prompt_tokens"], u["completion_tokens"]) for u in usages] == [
            (words, max_tokens)
        ]

    entry = only_entry(budgetgate, key["id"])
    assert entry["cost_source"] == "prices"
    assert entry["outcome"] == "ok"
    assert entry["stream"] is True
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (words, max_tokens)
    assert nanos(entry["cost"]) == genai_cost(words, max_tokens)
    assert nanos(budgetgate.key(key["id"])["spend"]) == genai_cost(words, max_tokens)


def test_sdk_streams_closed_at_done_are_charged_from_usage(budgetgate: BudgetGate) -> None:
    """The SDK's Stream stops at `data: [DONE]` and closes the connection at once, often before
    budgetgate has read LiteLLM's end of body. The charge must still be the usage's.

    (The ledger outcome of such a request is then often `client_disconnect` although the client
    got the whole answer: a budgetgate bug, reported; so the outcome is not asserted here.)"""
    key = new_key(budgetgate)
    client = budgetgate.client(key["key"])
    runs = 10
    for _ in range(runs):
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=messages(3), max_tokens=7, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entries = budgetgate.ledger(key["id"])
    assert len(entries) == runs
    for entry in entries:
        assert entry["cost_source"] == "prices", entry
        assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 7), entry
        assert nanos(entry["cost"]) == genai_cost(3, 7), entry
        assert entry["outcome"] in ("ok", "client_disconnect"), entry
    assert nanos(budgetgate.key(key["id"])["spend"]) == runs * genai_cost(3, 7)
    assert nanos(budgetgate.key(key["id"])["reserved"]) == 0


def test_usage_chunk_is_hidden_from_a_client_that_did_not_ask(budgetgate: BudgetGate) -> None:
    key = new_key(budgetgate)
    stream = budgetgate.client(key["key"]).chat.completions.create(
        model=MODEL, messages=messages(3), max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert chunks, "no chunks"
    assert [c.usage for c in chunks if c.usage is not None] == []


@pytest.mark.parametrize(
    ("words", "max_tokens"),
    [
        (3, 7),
        (4, 5),  # LiteLLM's header is 3.6000000000000003e-06: float noise must not cost more
    ],
)
def test_streamed_request_costs_the_same_as_non_streamed(
    budgetgate: BudgetGate, words: int, max_tokens: int
) -> None:
    costs = {}
    for stream in (False, True):
        key = new_key(budgetgate)
        client = budgetgate.client(key["key"])
        if stream:
            _, chunks = stream_to_end(
                client, model=MODEL, messages=messages(words), max_tokens=max_tokens
            )
            assert chunks
        else:
            client.chat.completions.create(
                model=MODEL, messages=messages(words), max_tokens=max_tokens
            )
        entry = only_entry(budgetgate, key["id"])
        assert entry["cost_source"] == ("prices" if stream else "upstream")
        costs[stream] = nanos(entry["cost"])
    assert costs[True] == genai_cost(words, max_tokens)
    assert costs[True] == costs[False], costs


def _upstream_requests(mock_upstream: ServerThread) -> int:
    return int(httpx.get(f"{mock_upstream.url}/mock/stats", timeout=10).json()["requests"])


@pytest.mark.parametrize("stream", [False, True])
def test_budget_blocks_requests_through_litellm(
    budgetgate: BudgetGate, mock_upstream: ServerThread, stream: bool
) -> None:
    # $0.0001: the first request (reserved ~$0.00008, charged 3 x $0.15/M + 100 x $0.60/M =
    # $0.00006045) is admitted; the second cannot fit its bound into what is left.
    key = new_key(budgetgate, max_budget=0.0001)
    client = budgetgate.client(key["key"])

    def ask() -> None:
        if stream:
            stream_to_end(client, model=MODEL, messages=messages(3), max_tokens=100)
        else:
            client.chat.completions.create(model=MODEL, messages=messages(3), max_tokens=100)

    ask()
    spent = nanos(budgetgate.key(key["id"])["spend"])
    assert spent == genai_cost(3, 100)

    before = _upstream_requests(mock_upstream)
    with pytest.raises(openai.RateLimitError) as blocked:
        ask()
    err = blocked.value
    assert err.status_code == 429
    assert err.code == "budget_exceeded"
    assert err.type == "budget_exceeded"
    assert "Budget exceeded" in err.message
    assert key["key"] not in err.message
    assert err.response.headers["x-budget-max-budget"] == "0.0001"
    assert "retry-after" in err.response.headers
    # Refused before forwarding: neither LiteLLM nor the model behind it saw the request.
    assert _upstream_requests(mock_upstream) == before

    after = budgetgate.key(key["id"])
    assert nanos(after["spend"]) == spent <= nanos("0.0001")
    assert nanos(after["reserved"]) == 0
    outcomes = sorted(e["outcome"] for e in budgetgate.ledger(key["id"]))
    assert outcomes == ["ok", "rejected"]


def test_zero_budget_blocks_the_first_request(budgetgate: BudgetGate) -> None:
    key = new_key(budgetgate, max_budget=0)
    with pytest.raises(openai.RateLimitError) as blocked:
        budgetgate.client(key["key"]).chat.completions.create(
            model=MODEL, messages=messages(3), max_tokens=5
        )
    assert blocked.value.code == "budget_exceeded"
    assert nanos(budgetgate.key(key["id"])["spend"]) == 0

"""The official openai SDK (sync and async) pointed at a real gateway: non-streamed and
streamed chat, budget headers, the over-budget error, the usage chunk, exact charges."""

from __future__ import annotations

import time
from datetime import datetime
from decimal import Decimal

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.e2e.conftest import LiveGateway
from tests.servers import ServerThread

PROMPT = "one two three four five"  # 5 prompt tokens at the mock
# bg-priced: $100/M input, $1000/M output -> 5 in + 10 out = 0.0005 + 0.01
PRICED_COST = Decimal("0.0105")
BUDGET_HEADERS = (
    "x-budget-spend",
    "x-budget-max-budget",
    "x-budget-remaining",
    "x-budget-reset-at",
    "x-request-id",
)


def sdk(gw: LiveGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def async_sdk(gw: LiveGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def messages(text: str = PROMPT) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def check_budget_headers(headers, spend: str, max_budget: str, remaining: str) -> None:  # noqa: ANN001
    for name in BUDGET_HEADERS:
        assert name in headers, (name, dict(headers))
    assert headers["x-budget-spend"] == spend
    assert headers["x-budget-max-budget"] == max_budget
    assert headers["x-budget-remaining"] == remaining
    reset = datetime.fromisoformat(headers["x-budget-reset-at"].replace("Z", "+00:00"))
    assert reset.tzinfo is not None and reset.day == 1  # 1mo budget: resets on the 1st
    assert headers["x-request-id"].startswith("req_")


def error_type(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    assert isinstance(body, dict), exc.body
    assert exc.response.json()["error"]["type"] == body["type"]
    return body["type"]


# -- 1. non-streamed, sync and async -------------------------------------------------------


def test_sync_sdk_chat_headers_and_over_budget(
    live: LiveGateway, mock_upstream: ServerThread
) -> None:
    key = live.create_key(max_budget=0.015)
    client = sdk(live, key["key"])
    raw = client.chat.completions.with_raw_response.create(
        model="bg-test", messages=messages(), max_tokens=10
    )
    # Upstream saw the gateway's credential (managed mode), never the client's, and the id.
    seen = httpx.get(mock_upstream.url + "/mock/stats").json()["last_headers"]
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen["x-request-id"] == raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.choices[0].message.content == " ".join(f"tok{i}" for i in range(10))
    assert completion.usage.completion_tokens == 10
    check_budget_headers(raw.headers, spend="0.01", max_budget="0.015", remaining="0.005")
    [entry] = live.wait_ledger(key["id"], 1)
    assert entry["request_id"] == raw.headers["x-request-id"]
    assert (entry["outcome"], entry["cost"], entry["cost_source"]) == (
        "ok",
        Decimal("0.01"),
        "prices",
    )
    assert entry["stream"] is False

    # 0.01 spent + up to 0.01 more would pass 0.015: rejected before forwarding.
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="bg-test", messages=messages(), max_tokens=10)
    assert info.value.status_code == 429
    assert error_type(info.value) == "budget_exceeded"
    assert key["key"] not in info.value.response.text
    check_budget_headers(info.value.response.headers, "0.01", "0.015", "0.005")
    assert int(info.value.response.headers["retry-after"]) >= 1
    entries = live.wait_ledger(key["id"], 2)
    assert sorted(e["outcome"] for e in entries) == ["ok", "rejected"]
    assert live.assert_settled(key["id"])["spend"] == Decimal("0.01")


async def test_async_sdk_chat_headers_and_over_budget(live: LiveGateway) -> None:
    key = live.create_key(max_budget=0.015)
    client = async_sdk(live, key["key"])
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="bg-test", messages=messages(), max_tokens=10
        )
        completion = raw.parse()
        assert completion.usage.completion_tokens == 10
        check_budget_headers(raw.headers, spend="0.01", max_budget="0.015", remaining="0.005")
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(
                model="bg-test", messages=messages(), max_tokens=10
            )
        assert error_type(info.value) == "budget_exceeded"
    finally:
        await client.close()
    live.wait_ledger(key["id"], 2)
    assert live.assert_settled(key["id"])["spend"] == Decimal("0.01")


# -- 2. streaming --------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_sync_stream_incremental_usage_chunk_and_cost(
    live: LiveGateway, include_usage: bool
) -> None:
    key = live.create_key()
    client = sdk(live, key["key"])
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(
        model="bg-priced",
        messages=messages(),
        max_tokens=10,
        stream=True,
        extra_headers={"x-mock-delay-ms": "50"},
        **extra,
    )
    arrivals, chunks = [], []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    # Passed through as it arrives, not buffered whole (~12 events 50 ms apart).
    assert arrivals[0] < arrivals[-1] - 0.2, arrivals
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"tok{i}" for i in range(10))
    usage_chunks = [c for c in chunks if c.usage is not None]
    empty_choice_chunks = [c for c in chunks if not c.choices]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks == empty_choice_chunks, chunks
        assert usage_chunks[0].usage.prompt_tokens == 5
        assert usage_chunks[0].usage.completion_tokens == 10
    else:
        assert usage_chunks == [] and empty_choice_chunks == [], chunks

    [streamed] = live.wait_ledger(key["id"], 1)
    assert streamed["stream"] is True
    assert streamed["outcome"] == "ok"
    assert streamed["cost_source"] == "prices"
    assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (5, 10)

    # The same request, not streamed, costs exactly the same.
    client.chat.completions.create(model="bg-priced", messages=messages(), max_tokens=10)
    entries = live.wait_ledger(key["id"], 2)
    plain = next(e for e in entries if e["request_id"] != streamed["request_id"])
    assert plain["stream"] is False
    assert streamed["cost"] == plain["cost"] == PRICED_COST
    live.assert_settled(key["id"])


async def test_async_stream_with_and_without_usage(live: LiveGateway) -> None:
    key = live.create_key()
    client = async_sdk(live, key["key"])
    try:
        for include_usage in (False, True):
            extra = {"stream_options": {"include_usage": True}} if include_usage else {}
            stream = await client.chat.completions.create(
                model="bg-priced",
                messages=messages(),
                max_tokens=10,
                stream=True,
                extra_headers={"x-mock-delay-ms": "50"},
                **extra,
            )
            arrivals, chunks = [], []
            async for chunk in stream:
                arrivals.append(time.monotonic())
                chunks.append(chunk)
            assert arrivals[0] < arrivals[-1] - 0.2, arrivals
            usage_chunks = [c for c in chunks if c.usage is not None]
            assert len(usage_chunks) == (1 if include_usage else 0), chunks
            assert len([c for c in chunks if not c.choices]) == len(usage_chunks)
    finally:
        await client.close()
    entries = live.wait_ledger(key["id"], 2)
    for e in entries:
        assert (e["stream"], e["outcome"], e["cost_source"]) == (True, "ok", "prices")
        assert e["cost"] == PRICED_COST
    assert live.assert_settled(key["id"])["spend"] == 2 * PRICED_COST


def test_raw_stream_has_no_usage_bytes_unless_asked(live_sqlite: LiveGateway) -> None:
    """On the wire: without include_usage, no usage object is ever sent; the stream ends with
    [DONE] and carries the budget headers."""
    gw = live_sqlite
    key = gw.create_key()
    for include_usage in (False, True):
        body = {
            "model": "bg-test",
            "messages": messages(),
            "max_tokens": 5,
            "stream": True,
        }
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        with gw.http.stream(
            "POST",
            "/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {key['key']}"},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert "x-budget-remaining" in r.headers and "x-request-id" in r.headers
            raw = r.read()
        assert raw.endswith(b"data: [DONE]\n\n")
        assert raw.count(b'"usage":{') == (1 if include_usage else 0), raw
    gw.wait_ledger(key["id"], 2)
    assert gw.assert_settled(key["id"])["spend"] == Decimal("0.01")

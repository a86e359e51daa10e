"""Usage by category, as each API reports it (body and stream), and its charge at each
category's own price (SPEC 10)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from genai_prices import Usage as GenaiUsage

from app.pricing.cost import CostCalculator, price_usage
from app.pricing.money import dollars_to_nanos
from app.pricing.prices import PriceBook
from app.proxy.usage import StreamMeter, Usage, usage_from_body, usage_from_object

BOOK = PriceBook()
COSTS = CostCalculator(BOOK, "reject", False)


def genai_nanos(model: str, **usage: int) -> int:
    profile = BOOK.profile(model)
    assert profile is not None
    return dollars_to_nanos(profile.current().calc_price(GenaiUsage(**usage))["total_price"])


def sse(events: list[tuple[str | None, Any]]) -> bytes:
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + b"\n"
        out += b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"
    return out


def test_chat_usage_details() -> None:
    usage = usage_from_object(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 200,
            "total_tokens": 1200,
            "prompt_tokens_details": {"cached_tokens": 600, "audio_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 50, "audio_tokens": 120},
        }
    )
    assert usage == Usage(
        1000,
        200,
        cache_read_tokens=600,
        input_audio_tokens=100,
        output_audio_tokens=120,
        reasoning_tokens=50,
    )


def test_litellm_anthropic_cache_writes_beside_chat_usage() -> None:
    usage = usage_from_object(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 100},
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 100,
        }
    )
    assert usage == Usage(1000, 5, cache_read_tokens=100, cache_write_tokens=300)


def test_gemini_thoughts_left_out_of_completion_tokens_are_charged() -> None:
    usage = usage_from_object({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 90})
    assert usage is not None and usage.completion_tokens == 80


def test_anthropic_usage_adds_cache_to_input_and_splits_writes() -> None:
    usage = usage_from_object(
        {
            "input_tokens": 100,
            "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 5000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 1000,
                "ephemeral_1h_input_tokens": 2000,
            },
            "output_tokens": 40,
            "server_tool_use": {"web_search_requests": 3},
        }
    )
    assert usage == Usage(
        8100,
        40,
        cache_read_tokens=5000,
        cache_write_tokens=1000,
        cache_write_1h_tokens=2000,
        web_searches=3,
    )
    # Charged at each category's price, as genai-prices computes it.
    expected = genai_nanos(
        "claude-sonnet-4-5",
        input_tokens=8100,
        cache_read_tokens=5000,
        cache_write_tokens=3000,
        cache_write_5m_tokens=1000,
        cache_write_1h_tokens=2000,
        output_tokens=40,
        web_searches=3,
    )
    assert COSTS.from_usage(["claude-sonnet-4-5"], usage) == expected
    # A cache write costs more than plain input, a cached read less.
    plain = COSTS.from_usage(["claude-sonnet-4-5"], Usage(8100, 40, web_searches=3))
    assert plain is not None and expected != plain


def test_responses_web_search_calls_are_counted_and_charged() -> None:
    body = {
        "model": "gpt-4o",
        "output": [
            {"type": "web_search_call", "id": "ws_1", "status": "completed"},
            {"type": "web_search_call", "id": "ws_2", "status": "completed"},
            {"type": "file_search_call", "id": "fs_1", "status": "completed"},
            {"type": "message", "content": []},
        ],
        "usage": {
            "input_tokens": 500,
            "input_tokens_details": {"cached_tokens": 100},
            "output_tokens": 50,
            "output_tokens_details": {"reasoning_tokens": 10},
        },
    }
    usage, model = usage_from_body(body)
    assert model == "gpt-4o"
    assert usage == Usage(
        500, 50, cache_read_tokens=100, reasoning_tokens=10, web_searches=2, file_searches=1
    )
    cost = COSTS.from_usage(["gpt-4o"], usage)
    # $2.5/M input, $1.25/M cached, $10/M output, $10/1k searches, $2.5/1k file searches
    assert cost == dollars_to_nanos(
        Decimal("400") * Decimal("2.5") / 10**6
        + Decimal("100") * Decimal("1.25") / 10**6
        + Decimal("50") * 10 / 10**6
        + Decimal("0.02")
        + Decimal("0.0025")
    )


def test_responses_stream_counts_web_search_calls() -> None:
    meter = StreamMeter(drop_usage_chunk=False)
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
    completed = {
        "type": "response.completed",
        "response": {
            "model": "gpt-4o",
            "output": [item, item],
            "usage": {"input_tokens": 10, "output_tokens": 5},
        },
    }
    stream = sse(
        [
            ("response.output_item.done", {"type": "response.output_item.done", "item": item}),
            ("response.output_item.done", {"type": "response.output_item.done", "item": item}),
            ("response.completed", completed),
        ]
    )
    meter.feed(stream)
    assert meter.completed
    assert meter.usage == Usage(10, 5, web_searches=2)


def test_responses_stream_cut_after_searches_still_charges_them() -> None:
    meter = StreamMeter(drop_usage_chunk=False)
    item = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
    meter.feed(
        sse([("response.output_item.done", {"type": "response.output_item.done", "item": item})])
    )
    assert not meter.completed and meter.usage is None
    assert meter.fallback_usage(7).web_searches == 1


def test_anthropic_stream_usage_is_cumulative_with_server_tools() -> None:
    meter = StreamMeter(drop_usage_chunk=False)
    start = {
        "type": "message_start",
        "message": {
            "model": "claude-sonnet-4-5",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 90,
                "cache_creation_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    }
    delta = {
        "type": "message_delta",
        "usage": {"output_tokens": 70, "server_tool_use": {"web_search_requests": 2}},
    }
    meter.feed(sse([("message_start", start)]))
    assert meter.usage_partial
    meter.feed(sse([("message_delta", delta), ("message_stop", {"type": "message_stop"})]))
    assert meter.completed and not meter.usage_partial
    assert meter.usage == Usage(100, 70, cache_read_tokens=90, web_searches=2)


def test_chat_stream_usage_chunk_with_cached_tokens() -> None:
    meter = StreamMeter(drop_usage_chunk=True)
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 40},
    }
    chunk = {"object": "chat.completion.chunk", "model": "gpt-4o", "choices": [], "usage": usage}
    out = meter.feed(sse([(None, chunk), (None, b"[DONE]")]))
    assert b"usage" not in out  # the client did not ask for it
    assert meter.usage == Usage(50, 3, cache_read_tokens=40)
    assert price_usage(BOOK.profile("gpt-4o"), meter.usage) == genai_nanos(  # type: ignore[arg-type]
        "gpt-4o", input_tokens=50, cache_read_tokens=40, output_tokens=3
    )


def test_a_failed_response_is_charged_its_usage_but_is_not_complete() -> None:
    meter = StreamMeter(drop_usage_chunk=False)
    failed = {
        "type": "response.failed",
        "response": {"model": "gpt-4o", "usage": {"input_tokens": 30, "output_tokens": 2}},
    }
    meter.feed(sse([("response.failed", failed)]))
    assert not meter.completed  # the client is told the stream failed
    assert meter.usage == Usage(30, 2)


def test_images_generated_by_a_tool_are_charged_the_dearest_image() -> None:
    body = {
        "model": "gpt-4o",
        "output": [{"type": "image_generation_call", "id": "ig_1", "status": "completed"}],
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    usage, _ = usage_from_body(body)
    assert usage == Usage(0, 0, images_generated=1)
    assert COSTS.from_usage(["gpt-4o"], usage) == 250_000_000  # gpt-image-1, high, 1024x1536

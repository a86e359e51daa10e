"""A fake upstream that bills like a provider at its worst (BILLING-RULES): every output
multiplier to its cap, images by the tile rule, documents and stored context up to the
model's context window, the tool calls it is allowed with their fees, audio output at the
audio price, and (header `x-breaker-answer-model`) an answer by another model."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.pricing.prices import PriceBook
from tests.pricing.provider import IMAGE_TOKENS

_BOOK = PriceBook()
SEARCH_TOKENS = 8_000  # what one web search adds to the input (mini models' fixed block)
STORED_CONTEXT = 100_000  # tokens behind a previous_response_id


def _window(model: str) -> int:
    profile = _BOOK.profile(model)
    assert profile is not None and profile.context_window is not None, model
    return profile.context_window


def _input_tokens(model: str, raw: bytes, parts: list[Any], stored: int) -> int:
    """Text at a token per 4 bytes, images by the tile rule, documents fill the window."""
    tokens = len(raw) // 4 + stored
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_image", "image"):
            tokens += IMAGE_TOKENS.get(model, _window(model))
        elif kind in ("file", "input_file", "document"):
            tokens += _window(model)
    return min(tokens, _window(model))


def _parts(messages: Any) -> list[Any]:
    parts: list[Any] = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts += content
    return parts


def _answering(request: Request, body: dict[str, Any]) -> str:
    return request.headers.get("x-breaker-answer-model", body["model"])


def _answer(request: Request, body: dict[str, Any], obj: dict[str, Any]) -> Response:
    obj["model"] = _answering(request, body)
    return Response(orjson.dumps(obj), media_type="application/json")


async def chat(request: Request) -> Response:
    raw = await request.body()
    body = orjson.loads(raw)
    model = _answering(request, body)
    cap = body.get("max_completion_tokens") or body["max_tokens"]
    n = body.get("n", 1)
    completion = n * cap
    audio_out = completion if "audio" in (body.get("modalities") or []) else 0
    prompt = _input_tokens(model, raw, _parts(body["messages"]), 0)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "completion_tokens_details": {"audio_tokens": audio_out, "reasoning_tokens": 0},
    }
    choices = [
        {"index": i, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}
        for i in range(n)
    ]
    return _answer(request, body, {"object": "chat.completion", "choices": choices, "usage": usage})


async def completions(request: Request) -> Response:
    raw = await request.body()
    body = orjson.loads(raw)
    prompt = body["prompt"]
    prompts = len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str | list) else 1
    samplings = prompts * max(body.get("n", 1), body.get("best_of", 1))
    completion = samplings * body.get("max_tokens", 16)
    usage = {
        "prompt_tokens": len(raw) // 4,
        "completion_tokens": completion,
        "total_tokens": len(raw) // 4 + completion,
    }
    return _answer(request, body, {"object": "text_completion", "choices": [], "usage": usage})


async def responses(request: Request) -> Response:
    raw = await request.body()
    body = orjson.loads(raw)
    model = _answering(request, body)
    items = body["input"] if isinstance(body["input"], list) else []
    stored = STORED_CONTEXT if body.get("previous_response_id") else 0
    prompt = _input_tokens(model, raw, _parts(items), stored)
    calls = body.get("max_tool_calls", 0) if body.get("tools") else 0
    # Each search is read back as input in a new pass over the grown context.
    total_input = prompt + sum(
        min(prompt + k * SEARCH_TOKENS, _window(model)) for k in range(1, calls + 1)
    )
    output = [
        {"type": "web_search_call", "id": f"ws_{k}", "status": "completed"} for k in range(calls)
    ]
    output.append({"type": "message", "role": "assistant", "content": []})
    usage = {
        "input_tokens": total_input,
        "output_tokens": body["max_output_tokens"],
        "total_tokens": total_input + body["max_output_tokens"],
    }
    return _answer(request, body, {"object": "response", "output": output, "usage": usage})


async def messages(request: Request) -> Response:
    raw = await request.body()
    body = orjson.loads(raw)
    model = _answering(request, body)
    prompt = _input_tokens(model, raw, _parts(body["messages"]), 0)
    searches = sum(t.get("max_uses", 0) for t in body.get("tools") or [])
    usage = {
        "input_tokens": prompt,
        "output_tokens": body["max_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "server_tool_use": {"web_search_requests": searches},
    }
    return _answer(request, body, {"type": "message", "content": [], "usage": usage})


def create_breaker_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/messages", messages, methods=["POST"]),
        ]
    )

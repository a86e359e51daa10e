"""A small, fast, OpenAI-compatible fake upstream (stands in for LiteLLM).

Used to try the gateway, in tests (including fault injection) and in benchmarks, so it
is deliberately a raw Starlette app: orjson bodies, no pydantic, no per-request logging.

Deterministic token rules (so tests can compute exact costs):

* completion/output tokens = ``max_tokens``, else ``max_completion_tokens``, else
  ``max_output_tokens``, else 16; capped at 100000. Header ``x-mock-completion-tokens``
  overrides. The content is ``"tok0 tok1 ..."`` (one token per word; one per stream chunk).
* prompt/input tokens = number of whitespace-separated words in all prompt text
  (chat message contents and text parts, ``prompt``, ``input``, responses
  ``instructions``, anthropic ``system`` + messages), minimum 1. Header
  ``x-mock-prompt-tokens`` overrides.

Fault injection via request headers: ``x-mock-delay-ms``, ``x-mock-first-byte-delay-ms``,
``x-mock-status``, ``x-mock-die-after``, ``x-mock-hang``, ``x-mock-cost``,
``x-mock-no-usage`` (a whole answer without its ``usage``), ``x-mock-no-terminal`` (a stream
that ends cleanly without ``[DONE]``, ``response.completed`` or ``message_stop``) (see
``_Faults``). Usage categories: ``x-mock-cached-tokens: N`` (N of the input read from the
cache), ``x-mock-web-searches: N`` (N web searches: Responses ``web_search_call`` items,
Anthropic ``server_tool_use``). ``GET /mock/stats`` shows the last request's headers and JSON body, and the most requests answered at once.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

MAX_COMPLETION_TOKENS = 100_000
DEFAULT_COMPLETION_TOKENS = 16
EMBEDDING_DIMS = 8
MODELS = ("gpt-4o-mini", "gpt-4o", "mock-model", "text-embedding-3-small")
ERROR_BODY = orjson.dumps(
    {
        "error": {
            "message": "mock upstream error",
            "type": "server_error",
            "code": None,
            "param": None,
        }
    }
)
_FLUSH_BYTES = 32 * 1024
_SSE_HEADERS = {"cache-control": "no-cache"}


class MockStreamAbort(Exception):
    """Raised inside a streaming body (x-mock-die-after) so the server drops the connection."""


# --------------------------------------------------------------------------- helpers


def _int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _flag(headers: Any, name: str) -> bool:
    value = headers.get(name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


_TERMINAL_EVENTS = (b"data: [DONE]", b"event: response.completed", b"event: message_stop")


def _words(obj: Any) -> int:
    """Whitespace-separated words in any prompt-ish structure (ints count as tokens)."""
    if isinstance(obj, str):
        return len(obj.split())
    if isinstance(obj, list):
        return sum(_words(item) for item in obj)
    if isinstance(obj, dict):
        text = obj.get("text")
        if isinstance(text, str):
            return len(text.split())
        if "content" in obj:
            return _words(obj["content"])
        output = obj.get("output")
        if isinstance(output, str):
            return len(output.split())
        return 0
    if isinstance(obj, int) and not isinstance(obj, bool):
        return 1  # token-id arrays (completions prompt / embeddings input)
    return 0


def _completion_tokens(body: dict[str, Any], headers: Any) -> int:
    n = _int_header(headers, "x-mock-completion-tokens")
    if n is None:
        n = DEFAULT_COMPLETION_TOKENS
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                n = int(value)
                break
    return max(0, min(n, MAX_COMPLETION_TOKENS))


def _prompt_tokens(headers: Any, *parts: Any) -> int:
    n = _int_header(headers, "x-mock-prompt-tokens")
    if n is not None:
        return max(0, n)
    return max(1, sum(_words(p) for p in parts))


def _content(n: int) -> str:
    return " ".join([f"tok{i}" for i in range(n)])


def _token(i: int) -> str:
    """The i-th streamed piece; concatenating all pieces gives ``_content(n)``."""
    return f"tok{i}" if i == 0 else f" tok{i}"


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(obj), status_code=status, headers=headers, media_type="application/json"
    )


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _usage_chunk(cid: str, obj: str, created: int, model: str, usage: Any) -> bytes:
    """OpenAI's usage-only chunk (stream_options.include_usage): no choices, just usage."""
    return _sse(
        {
            "id": cid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
    )


def _sse_event(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _bad_request(message: str) -> Response:
    return _json(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": None,
                "param": None,
            }
        },
        status=400,
    )


class _MockStreamingResponse(StreamingResponse):
    """StreamingResponse that, on ``MockStreamAbort``, returns without finishing the body.

    uvicorn then closes the connection without the chunked terminator (logging a single
    "ASGI callable returned without completing response" line instead of a traceback);
    the client sees the bytes sent so far followed by an unexpected EOF.
    """

    async def stream_response(self, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except MockStreamAbort:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _FastStreamingResponse(_MockStreamingResponse):
    """Without the per-request disconnect-listener task (used when there is no delay)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.stream_response(send)


class _Faults:
    __slots__ = (
        "delay",
        "first_byte_delay",
        "status",
        "die_after",
        "hang",
        "cost",
        "no_usage",
        "no_terminal",
    )

    def __init__(self, headers: Any) -> None:
        delay = _int_header(headers, "x-mock-delay-ms")
        self.delay = delay / 1000 if delay and delay > 0 else 0.0
        fbd = _int_header(headers, "x-mock-first-byte-delay-ms")
        self.first_byte_delay = fbd / 1000 if fbd and fbd > 0 else 0.0
        self.status = _int_header(headers, "x-mock-status")
        self.die_after = _int_header(headers, "x-mock-die-after")
        self.hang = _flag(headers, "x-mock-hang")
        self.cost = headers.get("x-mock-cost")
        self.no_usage = _flag(headers, "x-mock-no-usage")
        self.no_terminal = _flag(headers, "x-mock-no-terminal")

    def response_headers(self, base: dict[str, str] | None = None) -> dict[str, str] | None:
        if self.cost is None:
            return base
        headers = dict(base) if base else {}
        headers["x-litellm-response-cost"] = self.cost
        return headers


async def _wait_for_disconnect(request: Request) -> None:
    """x-mock-hang: never answer; return only once the client goes away (or after 1 h)."""
    try:
        async with asyncio.timeout(3600):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return
    except (TimeoutError, RuntimeError):
        pass


def _error_response(faults: _Faults) -> Response:
    status = faults.status or 500
    headers = faults.response_headers()
    if status < 200 or status in (204, 304):
        return Response(status_code=status, headers=headers)
    return Response(ERROR_BODY, status_code=status, headers=headers, media_type="application/json")


async def _stream_body(
    pre: Iterable[bytes],
    content: Iterator[bytes],
    post: Callable[[], Iterable[bytes]],
    faults: _Faults,
) -> AsyncIterator[bytes]:
    """Yield SSE events: ``pre``, the content events, then ``post()``.

    With ``x-mock-delay-ms`` every event is preceded by a sleep and sent on its own;
    otherwise events are coalesced into ~32 KiB writes (same bytes on the wire).
    ``x-mock-die-after: N`` stops after min(N, len(content)) content events and raises,
    which makes uvicorn drop the connection without the chunked terminator.
    """
    die_after = faults.die_after
    delay = faults.delay
    if faults.no_terminal:
        complete = post

        def post() -> Iterable[bytes]:
            return [e for e in complete() if not e.startswith(_TERMINAL_EVENTS)]

    if delay:
        for event in pre:
            await asyncio.sleep(delay)
            yield event
        for i, event in enumerate(content):
            if die_after is not None and i >= die_after:
                break
            await asyncio.sleep(delay)
            yield event
        if die_after is not None:
            raise MockStreamAbort("x-mock-die-after")
        for event in post():
            await asyncio.sleep(delay)
            yield event
        return

    buf = bytearray()
    for event in pre:
        buf += event
    for i, event in enumerate(content):
        if die_after is not None and i >= die_after:
            break
        buf += event
        if len(buf) >= _FLUSH_BYTES:
            yield bytes(buf)
            buf.clear()
    if die_after is None:
        for event in post():
            buf += event
    if buf:
        yield bytes(buf)
    if die_after is not None:
        raise MockStreamAbort("x-mock-die-after")


def _streaming(body: AsyncIterator[bytes], faults: _Faults) -> Response:
    cls = _MockStreamingResponse if faults.delay else _FastStreamingResponse
    return cls(body, media_type="text/event-stream", headers=faults.response_headers(_SSE_HEADERS))


# --------------------------------------------------------------------------- app


def create_mock_app() -> Starlette:
    state: dict[str, Any] = {
        "requests": 0,
        "last_headers": {},
        "in_flight": 0,
        "most_in_flight": 0,
    }
    ids = itertools.count(1)

    def _next_id(prefix: str) -> str:
        return f"{prefix}mock{next(ids):08d}"

    async def _begin(request: Request) -> tuple[_Faults, Response | None]:
        """Count the request, then apply hang / first-byte delay / status faults."""
        headers = request.headers
        state["requests"] += 1
        state["last_headers"] = dict(headers)
        faults = _Faults(headers)
        if faults.hang:
            await _wait_for_disconnect(request)
            return faults, Response(status_code=499)
        if faults.first_byte_delay:
            await asyncio.sleep(faults.first_byte_delay)
        if faults.status is not None:
            return faults, _error_response(faults)
        return faults, None

    async def _begin_json(
        request: Request,
    ) -> tuple[_Faults, dict[str, Any], Response | None]:
        faults, early = await _begin(request)
        if early is not None:
            return faults, {}, early
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            return faults, {}, _bad_request("request body is not valid JSON")
        if not isinstance(body, dict):
            return faults, {}, _bad_request("request body must be a JSON object")
        state["last_body"] = body
        return faults, body, None

    async def _answer(faults: _Faults, obj: Any) -> Response:
        if faults.no_usage and isinstance(obj, dict):
            obj.pop("usage", None)
        if faults.delay:
            await asyncio.sleep(faults.delay)
        return _json(obj, headers=faults.response_headers())

    # ------------------------------------------------------------------ models

    async def models(request: Request) -> Response:
        faults, early = await _begin(request)
        if early is not None:
            return early
        created = 1_700_000_000
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "mock"} for m in MODELS
        ]
        return await _answer(faults, {"object": "list", "data": data})

    # ------------------------------------------------------------------ chat

    async def chat_completions(request: Request) -> Response:
        faults, body, early = await _begin_json(request)
        if early is not None:
            return early
        model = body.get("model", "mock-model")
        n_out = _completion_tokens(body, request.headers)
        n_in = _prompt_tokens(
            request.headers, [_message_text(m) for m in _as_list(body, "messages")]
        )
        usage: dict[str, Any] = {
            "prompt_tokens": n_in,
            "completion_tokens": n_out,
            "total_tokens": n_in + n_out,
        }
        cached = _int_header(request.headers, "x-mock-cached-tokens")
        if cached is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": min(cached, n_in)}
        cid = _next_id("chatcmpl-")
        created = int(time.time())
        if not body.get("stream"):
            return await _answer(
                faults,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": _content(n_out),
                                "refusal": None,
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if include_usage:
                obj["usage"] = None  # OpenAI sends usage: null on every chunk in this mode
            return _sse(obj)

        def content() -> Iterator[bytes]:
            for i in range(n_out):
                if i == 0:
                    yield chunk({"role": "assistant", "content": _token(0)}, None)
                else:
                    yield chunk({"content": _token(i)}, None)

        def post() -> list[bytes]:
            events = []
            if n_out == 0:
                events.append(chunk({"role": "assistant", "content": ""}, None))
            events.append(chunk({}, "stop"))
            if include_usage:
                events.append(_usage_chunk(cid, "chat.completion.chunk", created, model, usage))
            events.append(b"data: [DONE]\n\n")
            return events

        return _streaming(_stream_body((), content(), post, faults), faults)

    # ------------------------------------------------------------------ completions

    async def completions(request: Request) -> Response:
        faults, body, early = await _begin_json(request)
        if early is not None:
            return early
        model = body.get("model", "mock-model")
        n_out = _completion_tokens(body, request.headers)
        n_in = _prompt_tokens(request.headers, body.get("prompt"))
        usage = {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}
        cid = _next_id("cmpl-")
        created = int(time.time())
        if not body.get("stream"):
            return await _answer(
                faults,
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "text": _content(n_out),
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str, finish: str | None) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                obj["usage"] = None
            return _sse(obj)

        def content() -> Iterator[bytes]:
            for i in range(n_out):
                yield chunk(_token(i), None)

        def post() -> list[bytes]:
            events = [chunk("", "stop")]
            if include_usage:
                events.append(_usage_chunk(cid, "text_completion", created, model, usage))
            events.append(b"data: [DONE]\n\n")
            return events

        return _streaming(_stream_body((), content(), post, faults), faults)

    # ------------------------------------------------------------------ responses

    async def responses(request: Request) -> Response:
        faults, body, early = await _begin_json(request)
        if early is not None:
            return early
        model = body.get("model", "mock-model")
        n_out = _completion_tokens(body, request.headers)
        n_in = _prompt_tokens(request.headers, body.get("instructions"), body.get("input"))
        cached = min(_int_header(request.headers, "x-mock-cached-tokens") or 0, n_in)
        searches = [
            {"type": "web_search_call", "id": f"ws_{k}", "status": "completed"}
            for k in range(_int_header(request.headers, "x-mock-web-searches") or 0)
        ]
        usage = {
            "input_tokens": n_in,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": n_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out,
        }
        rid = _next_id("resp_")
        mid = _next_id("msg_")
        created = int(time.time())
        text = _content(n_out)

        def response_obj(status: str, output: list[Any], usage_: Any) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": None,
                "temperature": 1.0,
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "metadata": {},
                "usage": usage_,
            }

        def message(status: str, parts: list[Any]) -> dict[str, Any]:
            return {
                "type": "message",
                "id": mid,
                "status": status,
                "role": "assistant",
                "content": parts,
            }

        part_done = {"type": "output_text", "text": text, "annotations": []}
        if not body.get("stream"):
            return await _answer(
                faults,
                response_obj("completed", [*searches, message("completed", [part_done])], usage),
            )

        seq = itertools.count()

        def ev(kind: str, **data: Any) -> bytes:
            return _sse_event(kind, {"type": kind, "sequence_number": next(seq), **data})

        def pre() -> Iterator[bytes]:
            yield ev("response.created", response=response_obj("in_progress", [], None))
            yield ev("response.in_progress", response=response_obj("in_progress", [], None))
            yield ev(
                "response.output_item.added",
                output_index=0,
                item=message("in_progress", []),
            )
            yield ev(
                "response.content_part.added",
                item_id=mid,
                output_index=0,
                content_index=0,
                part={"type": "output_text", "text": "", "annotations": []},
            )

        def content() -> Iterator[bytes]:
            for i in range(n_out):
                yield ev(
                    "response.output_text.delta",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    delta=_token(i),
                    logprobs=[],
                )

        def post() -> list[bytes]:
            return [
                ev(
                    "response.output_text.done",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    text=text,
                    logprobs=[],
                ),
                ev(
                    "response.content_part.done",
                    item_id=mid,
                    output_index=0,
                    content_index=0,
                    part=part_done,
                ),
                ev(
                    "response.output_item.done",
                    output_index=0,
                    item=message("completed", [part_done]),
                ),
                ev(
                    "response.completed",
                    response=response_obj(
                        "completed", [*searches, message("completed", [part_done])], usage
                    ),
                ),
            ]

        return _streaming(_stream_body(pre(), content(), post, faults), faults)

    # ------------------------------------------------------------------ embeddings

    async def embeddings(request: Request) -> Response:
        faults, body, early = await _begin_json(request)
        if early is not None:
            return early
        model = body.get("model", "text-embedding-3-small")
        raw_input = body.get("input", "")
        if (
            isinstance(raw_input, list)
            and raw_input
            and not all(isinstance(x, int) for x in raw_input)
        ):
            inputs = raw_input  # list of strings (or of token arrays)
        else:
            inputs = [raw_input]
        n_in = _prompt_tokens(request.headers, inputs)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(inputs):
            vector = _embedding(item)
            emb: Any = (
                base64.b64encode(struct.pack(f"<{EMBEDDING_DIMS}f", *vector)).decode()
                if as_base64
                else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return await _answer(
            faults,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": n_in, "total_tokens": n_in},
            },
        )

    # ------------------------------------------------------------------ anthropic

    async def messages(request: Request) -> Response:
        faults, body, early = await _begin_json(request)
        if early is not None:
            return early
        model = body.get("model", "mock-model")
        n_out = _completion_tokens(body, request.headers)
        n_in = _prompt_tokens(
            request.headers,
            body.get("system"),
            [_message_text(m) for m in _as_list(body, "messages")],
        )
        mid = _next_id("msg_")
        cached = min(_int_header(request.headers, "x-mock-cached-tokens") or 0, n_in)
        searches = _int_header(request.headers, "x-mock-web-searches") or 0
        tools_used = {"server_tool_use": {"web_search_requests": searches}} if searches else {}
        if not body.get("stream"):
            return await _answer(
                faults,
                {
                    "id": mid,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": _content(n_out)}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {
                        "input_tokens": n_in - cached,
                        "output_tokens": n_out,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": cached,
                        **tools_used,
                    },
                },
            )

        pre = [
            _sse_event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": n_in - cached,
                            "output_tokens": 1,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": cached,
                        },
                    },
                },
            ),
            _sse_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
        ]

        def content() -> Iterator[bytes]:
            delta = {"type": "text_delta", "text": ""}
            obj = {"type": "content_block_delta", "index": 0, "delta": delta}
            for i in range(n_out):
                delta["text"] = _token(i)
                yield _sse_event("content_block_delta", obj)

        def post() -> list[bytes]:
            return [
                _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"output_tokens": n_out, **tools_used},
                    },
                ),
                _sse_event("message_stop", {"type": "message_stop"}),
            ]

        return _streaming(_stream_body(pre, content(), post, faults), faults)

    # ------------------------------------------------------------------ echo / control

    async def echo(request: Request) -> Response:
        faults, early = await _begin(request)
        if early is not None:
            return early
        raw = await request.body()
        return await _answer(
            faults,
            {
                "path": request.url.path,
                "method": request.method,
                "query": request.url.query,
                "headers": dict(request.headers),
                "body": raw.decode("utf-8", "replace"),
            },
        )

    async def stats(request: Request) -> Response:
        return _json(
            {
                "requests": state["requests"],
                "last_headers": state["last_headers"],
                "last_body": state.get("last_body"),
                "in_flight": state["in_flight"],
                "most_in_flight": state["most_in_flight"],
            }
        )

    async def reset(request: Request) -> Response:
        state["requests"] = 0
        state["last_headers"] = {}
        state["last_body"] = None
        state["most_in_flight"] = state["in_flight"]
        return _json({"requests": 0})

    routes = [
        Route("/mock/stats", stats, methods=["GET"]),
        Route("/mock/reset", reset, methods=["POST"]),
    ]
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
            Route(f"{prefix}/completions", completions, methods=["POST"]),
            Route(f"{prefix}/responses", responses, methods=["POST"]),
            Route(f"{prefix}/embeddings", embeddings, methods=["POST"]),
            Route(f"{prefix}/messages", messages, methods=["POST"]),
        ]
    all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    routes.append(Route("/{path:path}", echo, methods=all_methods))
    app = Starlette(routes=routes, middleware=[Middleware(_CountInFlight, state=state)])
    app.state.mock = state
    return app


class _CountInFlight:
    """Counts the requests being answered at once, from their start to their last byte (the
    most at once is in /mock/stats: what a parallel-request limit lets through)."""

    def __init__(self, app: Any, state: dict[str, Any]) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/mock/"):
            await self.app(scope, receive, send)
            return
        state = self.state
        state["in_flight"] += 1
        state["most_in_flight"] = max(state["most_in_flight"], state["in_flight"])
        try:
            await self.app(scope, receive, send)
        finally:
            state["in_flight"] -= 1


def _as_list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    return value if isinstance(value, list) else []


def _message_text(message: Any) -> Any:
    """Only a message's content counts (not role/name/tool-call plumbing)."""
    return message.get("content") if isinstance(message, dict) else None


def _embedding(item: Any) -> list[float]:
    seed = zlib.crc32(orjson.dumps(item))
    return [round(((seed >> (3 * j)) & 0x3FF) / 1023.0, 6) for j in range(EMBEDDING_DIMS)]


def run(host: str = "127.0.0.1", port: int = 9100) -> None:
    import importlib.util

    import uvicorn

    uvicorn.run(
        create_mock_app(),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "auto",
        http="httptools" if importlib.util.find_spec("httptools") else "auto",
    )

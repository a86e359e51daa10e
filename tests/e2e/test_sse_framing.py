"""SSE framed with CRLF (the SSE spec allows \\r\\n; sse-starlette based servers such as
llama-cpp-python use it): the gateway must still see every event as it passes, so it relays
incrementally, drops the usage-only chunk the client did not ask for, and charges the usage."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.e2e.conftest import LiveGateway
from tests.servers import ServerThread


def _event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


async def _crlf_chat(request: Request) -> StreamingResponse:
    body = json.loads(await request.body())
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    async def gen() -> Iterator[bytes]:
        base = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"]}
        for i in range(4):
            await asyncio.sleep(0.1)
            ev = _event({**base, "choices": [{"index": 0, "delta": {"content": f"t{i} "}}]})
            # Split so that a "\r" and its "\n" travel in different writes.
            yield ev[:-1]
            await asyncio.sleep(0.01)
            yield ev[-1:]
        if include_usage:
            yield _event(
                {**base, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 4}}
            )
        yield b"data: [DONE]\r\n\r\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


@pytest.fixture(scope="module")
def crlf_upstream() -> Iterator[ServerThread]:
    server = ServerThread(
        Starlette(routes=[Route("/v1/chat/completions", _crlf_chat, methods=["POST"])])
    ).start()
    yield server
    server.stop()


@pytest.mark.parametrize("include_usage", [False, True])
def test_crlf_sse_is_metered_and_relayed_incrementally(
    live_factory: Callable[..., LiveGateway], crlf_upstream: ServerThread, include_usage: bool
) -> None:
    gw = live_factory(upstream_url=crlf_upstream.url)
    key = gw.create_key()
    body: dict = {
        "model": "bg-priced",
        "messages": [{"role": "user", "content": "hi there"}],
        "max_tokens": 10,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    arrivals, raw = [], b""
    with gw.http.stream(
        "POST",
        "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key['key']}"},
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            arrivals.append(time.monotonic())
            raw += chunk
    assert arrivals[0] < arrivals[-1] - 0.2, arrivals  # not buffered whole
    text = raw.replace(b"\r\n", b"\n")
    assert b"event: error" not in text, raw
    assert text.endswith(b"data: [DONE]\n\n"), raw
    assert text.count(b'"usage"') == (1 if include_usage else 0), raw
    assert text.count(b'"content"') == 4

    [entry] = gw.wait_ledger(key["id"], 1)
    assert (entry["outcome"], entry["cost_source"]) == ("ok", "prices")
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (2, 4)
    assert entry["cost"] == Decimal("0.0002") + Decimal("0.004")
    gw.assert_settled(key["id"])

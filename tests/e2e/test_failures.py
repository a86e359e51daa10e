"""Terminal paths other than success, through a real gateway: client disconnect mid-stream,
upstream errors, a stream that dies, upstream timeouts, an upstream that is not listening.
Every one ends in exactly one ledger entry and leaves nothing reserved."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest

from app.mock_upstream import ERROR_BODY
from tests.e2e.conftest import LiveGateway
from tests.servers import free_port

TOKEN = Decimal("0.001")  # bg-test: per output token, input free


def chat_body(max_tokens: int = 10, stream: bool = False, model: str = "bg-test") -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def auth(key: dict, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key['key']}", **extra}


def content_tokens(raw: bytes) -> int:
    """Content deltas (one mock token each) in an SSE stream of any metered format."""
    n = 0
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        obj = json.loads(line[6:])
        kind = obj.get("type")
        if kind in ("content_block_delta", "response.output_text.delta"):
            n += 1
            continue
        for choice in obj.get("choices") or []:
            if (choice.get("delta") or {}).get("content") or choice.get("text"):
                n += 1
    return n


# A streamed request of each metered streaming format, and the event that ends it cleanly.
STREAMS = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, b"[DONE]"),
    "completions": ("/v1/completions", {"prompt": "hi"}, b"[DONE]"),
    "responses": ("/v1/responses", {"input": "hi"}, b"response.completed"),
    "messages": (
        "/v1/messages",
        {"messages": [{"role": "user", "content": "hi"}]},
        b"message_stop",
    ),
}


def stream_request(kind: str, max_tokens: int) -> tuple[str, dict, bytes]:
    path, extra, clean_end = STREAMS[kind]
    bound = "max_output_tokens" if kind == "responses" else "max_tokens"
    return path, {"model": "bg-test", "stream": True, bound: max_tokens, **extra}, clean_end


def check_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code", "param"}
    assert "Traceback" not in r.text
    assert "x-request-id" in r.headers and "x-budget-remaining" in r.headers
    return err


# -- 4. client disconnect ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "messages"])
def test_client_disconnect_mid_stream(live: LiveGateway, kind: str) -> None:
    key = live.create_key()
    path, body, _ = stream_request(kind, 50)
    client = httpx.Client(base_url=live.url, timeout=30)
    received = b""
    with client.stream(
        "POST", path, json=body, headers=auth(key, **{"x-mock-delay-ms": "200"})
    ) as r:
        assert r.status_code == 200
        for chunk in r.iter_raw():
            received += chunk
            if content_tokens(received) >= 3:
                break
    client.close()  # the socket goes away mid-stream
    closed = time.monotonic()
    delivered = content_tokens(received)
    assert delivered >= 3

    [entry] = live.wait_ledger(key["id"], 1, deadline=2.0)
    assert time.monotonic() - closed < 2.5
    assert entry["outcome"] == "client_disconnect"
    assert entry["stream"] is True
    assert entry["cost_source"] == "estimated"
    assert entry["cost"] > 0
    assert entry["cost"] >= delivered * TOKEN  # at least what the client got
    assert entry["cost"] <= 50 * TOKEN  # never more than the request could have produced
    live.assert_settled(key["id"])


def test_client_disconnect_while_upstream_is_quiet(live_sqlite: LiveGateway) -> None:
    """The client leaves between two upstream events 2.5 s apart: the gateway notices at
    once (it listens for the disconnect), not at its next write."""
    gw = live_sqlite
    key = gw.create_key()
    path, body, _ = stream_request("chat", 5)
    client = httpx.Client(base_url=gw.url, timeout=30)
    with client.stream(
        "POST", path, json=body, headers=auth(key, **{"x-mock-delay-ms": "2500"})
    ) as r:
        assert r.status_code == 200
        received = next(r.iter_raw())
    client.close()
    assert content_tokens(received) >= 1
    [entry] = gw.wait_ledger(key["id"], 1, deadline=2.0)
    assert entry["outcome"] == "client_disconnect"
    assert entry["cost"] >= content_tokens(received) * TOKEN
    gw.assert_settled(key["id"])


async def test_async_sdk_closes_stream_midway(live_sqlite: LiveGateway) -> None:
    gw = live_sqlite
    key = gw.create_key()
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key["key"], max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="bg-test",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=50,
            stream=True,
            extra_headers={"x-mock-delay-ms": "200"},
        )
        got = 0
        async for chunk in stream:
            got += 1 if chunk.choices and chunk.choices[0].delta.content else 0
            if got == 2:
                break
        await stream.close()
    finally:
        await client.close()
    [entry] = gw.wait_ledger(key["id"], 1, deadline=2.0)
    assert entry["outcome"] == "client_disconnect"
    assert 2 * TOKEN <= entry["cost"] <= 50 * TOKEN
    gw.assert_settled(key["id"])


# -- 5. upstream failures ------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_500_passed_through_and_not_charged(live: LiveGateway, stream: bool) -> None:
    key = live.create_key()
    r = live.http.post(
        "/v1/chat/completions",
        json=chat_body(stream=stream),
        headers=auth(key, **{"x-mock-status": "500"}),
    )
    assert r.status_code == 500
    assert r.content == ERROR_BODY  # the upstream's body, unchanged
    assert "x-request-id" in r.headers and "x-budget-spend" in r.headers
    [entry] = live.wait_ledger(key["id"], 1)
    assert entry["request_id"] == r.headers["x-request-id"]
    assert (entry["outcome"], entry["cost"]) == ("upstream_error", 0)
    assert live.assert_settled(key["id"])["spend"] == 0


def test_upstream_500_with_reported_cost_is_charged(live: LiveGateway) -> None:
    key = live.create_key()
    r = live.http.post(
        "/v1/chat/completions",
        json=chat_body(),
        headers=auth(key, **{"x-mock-status": "500", "x-mock-cost": "0.0042"}),
    )
    assert r.status_code == 500 and r.content == ERROR_BODY
    [entry] = live.wait_ledger(key["id"], 1)
    assert entry["outcome"] == "upstream_error"
    assert (entry["cost"], entry["cost_source"]) == (Decimal("0.0042"), "upstream")
    assert live.assert_settled(key["id"])["spend"] == Decimal("0.0042")


def test_stream_dies_midway_sdk_raises(live: LiveGateway) -> None:
    key = live.create_key()
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=key["key"], max_retries=0)
    got = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # noqa: PT012
        stream = client.chat.completions.create(
            model="bg-test",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=10,
            stream=True,
            extra_headers={"x-mock-die-after": "3"},
        )
        for chunk in stream:
            got.append(chunk)
    assert len([c for c in got if c.choices and c.choices[0].delta.content]) == 3
    [entry] = live.wait_ledger(key["id"], 1)
    assert entry["outcome"] == "upstream_error"
    assert entry["cost_source"] == "estimated"
    assert 3 * TOKEN <= entry["cost"] <= 10 * TOKEN
    live.assert_settled(key["id"])


@pytest.mark.parametrize("kind", list(STREAMS))
def test_stream_dies_midway_wire_has_error_event_and_is_charged(
    live_sqlite: LiveGateway, kind: str
) -> None:
    gw = live_sqlite
    key = gw.create_key()
    path, body, clean_end = stream_request(kind, 10)
    with gw.http.stream(
        "POST", path, json=body, headers=auth(key, **{"x-mock-die-after": "5"})
    ) as r:
        assert r.status_code == 200
        raw = r.read()  # the gateway ends its own response cleanly, after an error event
    assert clean_end not in raw, raw
    last = raw.rstrip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\ndata: "), raw
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "upstream_error"
    delivered = content_tokens(raw)
    assert delivered == 5
    [entry] = gw.wait_ledger(key["id"], 1)
    assert entry["outcome"] == "upstream_error"
    assert entry["cost_source"] == "estimated"
    assert delivered * TOKEN <= entry["cost"] <= 10 * TOKEN
    gw.assert_settled(key["id"])


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_hang_times_out(live_factory: Callable[..., LiveGateway], stream: bool) -> None:
    gw = live_factory(upstream_timeout_seconds=1)
    key = gw.create_key()
    r = gw.http.post(
        "/v1/chat/completions",
        json=chat_body(stream=stream),
        headers=auth(key, **{"x-mock-hang": "1"}),
    )
    err = check_openai_error(r, 504)
    assert err["type"] == "upstream_error"
    [entry] = gw.wait_ledger(key["id"], 1)
    assert (entry["outcome"], entry["cost"]) == ("timeout", 0)
    assert gw.assert_settled(key["id"])["spend"] == 0


def test_upstream_times_out_mid_stream(live_factory: Callable[..., LiveGateway]) -> None:
    gw = live_factory(upstream_timeout_seconds=1)
    key = gw.create_key()
    with gw.http.stream(
        "POST",
        "/v1/chat/completions",
        json=chat_body(max_tokens=20, stream=True),
        headers=auth(key, **{"x-mock-delay-ms": "300"}),
    ) as r:
        assert r.status_code == 200
        raw = r.read()
    assert b"[DONE]" not in raw
    assert b"event: error" in raw
    delivered = content_tokens(raw)
    assert 1 <= delivered < 20
    [entry] = gw.wait_ledger(key["id"], 1)
    assert entry["outcome"] == "timeout"
    assert entry["cost_source"] == "estimated"
    assert delivered * TOKEN <= entry["cost"] <= 20 * TOKEN
    gw.assert_settled(key["id"])


def test_upstream_not_listening(live_factory: Callable[..., LiveGateway]) -> None:
    gw = live_factory(upstream_url=f"http://127.0.0.1:{free_port()}")
    key = gw.create_key()
    for stream in (False, True):
        r = gw.http.post("/v1/chat/completions", json=chat_body(stream=stream), headers=auth(key))
        err = check_openai_error(r, 502)
        assert err["type"] == "upstream_error"
    entries = gw.wait_ledger(key["id"], 2)
    assert [(e["outcome"], e["cost"]) for e in entries] == [("upstream_error", 0)] * 2
    assert gw.assert_settled(key["id"])["spend"] == 0

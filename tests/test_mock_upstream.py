"""The fake OpenAI-compatible upstream, exercised over a real uvicorn server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
import uvicorn

from app.mock_upstream import create_mock_app


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    config = uvicorn.Config(
        create_mock_app(), host="127.0.0.1", port=0, log_level="critical", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("mock upstream did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=5) as c:
        yield c


def _sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event = None
        data = ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                event = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
        events.append((event, data))
    return events


# ------------------------------------------------------------------------ models


def test_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "gpt-4o", "mock-model", "text-embedding-3-small"} <= ids


def test_routes_without_v1_prefix(http: httpx.Client) -> None:
    r = http.get("/models")
    assert r.json()["object"] == "list"
    r = http.post("/chat/completions", json={"model": "m", "messages": [], "max_tokens": 2})
    assert r.json()["object"] == "chat.completion"
    assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1"


# ------------------------------------------------------------------------ chat


def test_chat_non_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there  world"}]},
        ],
        max_tokens=5,
    )
    assert r.object == "chat.completion"
    assert r.model == "gpt-4o-mini"
    assert r.id
    assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 5, 10)


def test_chat_token_rules(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="m", messages=msgs)
    assert r.usage.completion_tokens == 16
    r = client.chat.completions.create(model="m", messages=msgs, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=10**9)
    assert r.usage.completion_tokens == 100_000
    r = client.chat.completions.create(
        model="m",
        messages=msgs,
        max_tokens=50,
        extra_headers={"x-mock-completion-tokens": "2", "x-mock-prompt-tokens": "1234"},
    )
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1234, 2)
    assert r.choices[0].message.content == "tok0 tok1"
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": ""}])
    assert r.usage.prompt_tokens == 1  # minimum


def test_chat_streamed_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=4,
            stream=True,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all(c.model == "gpt-4o" for c in chunks)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 4
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    assert text == "tok0 tok1 tok2 tok3"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 4)
    assert last.usage.total_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_chat_stream_wire_format(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": [], "max_tokens": 2, "stream": True},
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n")
    assert r.text.count("data: ") == 4  # 2 content + finish + [DONE]


# ------------------------------------------------------------------------ completions


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="m", prompt="say something nice", max_tokens=3)
    assert r.object == "text_completion"
    assert r.choices[0].text == "tok0 tok1 tok2"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 3, 6)


def test_completions_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="m",
            prompt=["a b", "c"],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)
    chunks = list(client.completions.create(model="m", prompt="x", max_tokens=2, stream=True))
    assert all(c.usage is None for c in chunks)


# ------------------------------------------------------------------------ responses


def test_responses(client: openai.OpenAI) -> None:
    r = client.responses.create(model="gpt-4o-mini", input="what is up", max_output_tokens=4)
    assert r.object == "response"
    assert r.status == "completed"
    assert r.model == "gpt-4o-mini"
    assert r.output_text == "tok0 tok1 tok2 tok3"
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (3, 4, 7)


def test_responses_message_list_input(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="m",
        input=[
            {"role": "user", "content": "a b"},
            {"role": "user", "content": [{"type": "input_text", "text": "c d e"}]},
        ],
        max_output_tokens=1,
    )
    assert r.usage.input_tokens == 5


def test_responses_streamed(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="m", input="x y", max_output_tokens=3, stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["tok0", " tok1", " tok2"]
    assert types[-1] == "response.completed"
    usage = events[-1].response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (2, 3, 5)


def test_responses_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input="x", max_output_tokens=2) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "tok0 tok1"
    assert final.usage.output_tokens == 2


# ------------------------------------------------------------------------ embeddings


def test_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in r.data)
    assert all(isinstance(x, float) for x in r.data[0].embedding)
    assert r.usage.prompt_tokens == 4 and r.usage.total_tokens == 4
    assert r.model == "text-embedding-3-small"
    r = client.embeddings.create(model="e", input="single input", encoding_format="float")
    assert len(r.data) == 1 and len(r.data[0].embedding) == 8
    assert r.usage.prompt_tokens == 2


# ------------------------------------------------------------------------ anthropic


def test_messages_non_streamed(http: httpx.Client) -> None:
    r = http.post(
        "/v1/messages",
        json={
            "model": "claude-x",
            "system": "you are terse",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
            "max_tokens": 3,
        },
    )
    body = r.json()
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "claude-x"
    assert body["content"] == [{"type": "text", "text": "tok0 tok1 tok2"}]
    assert body["stop_reason"] == "end_turn"
    assert body["usage"]["input_tokens"] == 5
    assert body["usage"]["output_tokens"] == 3


def test_messages_streamed(http: httpx.Client) -> None:
    r = http.post(
        "/v1/messages",
        json={
            "model": "claude-x",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
            "stream": True,
        },
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(r.text)
    names = [e for e, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [orjson.loads(d) for _, d in events]
    assert data[0]["message"]["usage"]["input_tokens"] == 1
    assert data[0]["message"]["usage"]["output_tokens"] == 1
    assert [d["delta"] for d in data[2:4]] == [
        {"type": "text_delta", "text": "tok0"},
        {"type": "text_delta", "text": " tok1"},
    ]
    assert data[5]["usage"]["output_tokens"] == 2
    assert data[5]["delta"]["stop_reason"] == "end_turn"


# ------------------------------------------------------------------------ echo & stats


def test_echo(http: httpx.Client) -> None:
    r = http.request(
        "PATCH",
        "/some/thing",
        params={"a": "1", "b": "x y"},
        content=b"raw body \xc3\xa9",
        headers={"X-Custom": "Val", "Authorization": "Bearer k"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["path"] == "/some/thing"
    assert body["method"] == "PATCH"
    assert body["query"] == "a=1&b=x+y"
    assert body["headers"]["x-custom"] == "Val"
    assert body["headers"]["authorization"] == "Bearer k"
    assert body["body"] == "raw body é"
    # known route, unknown method: echoed too
    assert http.delete("/v1/models").json()["method"] == "DELETE"


def test_stats_and_reset(http: httpx.Client) -> None:
    http.post("/mock/reset")
    assert http.get("/mock/stats").json()["requests"] == 0
    http.get("/v1/models")
    http.post("/v1/chat/completions", json={"messages": []}, headers={"x-trace": "t1"})
    http.get("/anything")
    stats = http.get("/mock/stats").json()
    assert stats["requests"] == 3
    assert stats["last_headers"]["host"].startswith("127.0.0.1")
    assert "x-trace" not in stats["last_headers"]
    http.post("/v1/chat/completions", json={"messages": []}, headers={"X-Trace": "t2"})
    assert http.get("/mock/stats").json()["last_headers"]["x-trace"] == "t2"
    http.post("/mock/reset")
    assert http.get("/mock/stats").json()["requests"] == 0


# ------------------------------------------------------------------------ faults


def test_status_fault(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.InternalServerError) as exc_info:
        client.chat.completions.create(
            model="m", messages=[], extra_headers={"x-mock-status": "503"}
        )
    assert exc_info.value.status_code == 503
    r = http.post("/v1/responses", json={"input": "x"}, headers={"x-mock-status": "429"})
    assert r.status_code == 429
    assert r.json() == {
        "error": {
            "message": "mock upstream error",
            "type": "server_error",
            "code": None,
            "param": None,
        }
    }


def test_cost_header(client: openai.OpenAI, http: httpx.Client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[], max_tokens=1, extra_headers={"x-mock-cost": "0.0123"}
    )
    assert raw.headers["x-litellm-response-cost"] == "0.0123"
    assert raw.parse().usage.completion_tokens == 1
    r = http.post("/v1/embeddings", json={"input": "a"})
    assert "x-litellm-response-cost" not in r.headers


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", {"messages": [], "stream": True}),
        ("/v1/completions", {"prompt": "p", "stream": True}),
        ("/v1/responses", {"input": "p", "stream": True}),
        ("/v1/messages", {"messages": [], "stream": True}),
    ],
)
@pytest.mark.parametrize("delay", [None, "1"])
def test_die_after(http: httpx.Client, path: str, payload: dict, delay: str | None) -> None:
    headers = {"x-mock-die-after": "3"}
    if delay:
        headers["x-mock-delay-ms"] = delay
    received = b""
    with http.stream("POST", path, json=payload | {"max_tokens": 10}, headers=headers) as r:
        assert r.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for part in r.iter_bytes():
                received += part
    text = received.decode()
    assert "tok2" in text and "tok3" not in text
    assert "[DONE]" not in text and '"usage"' not in text.split("tok2")[-1]
    assert "message_stop" not in text and "response.completed" not in text


def test_die_after_openai_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m",
        messages=[],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-die-after": "2"},
    )
    seen = []
    # The SDK (built on its own httpx fork, `httpx2`) wraps the mid-stream
    # RemoteProtocolError in APIConnectionError.
    with pytest.raises(openai.APIConnectionError) as exc_info:
        for chunk in stream:
            seen.append(chunk)
    assert len(seen) == 2
    assert type(exc_info.value.__cause__).__name__ == "RemoteProtocolError"


def test_delays(http: httpx.Client) -> None:
    t0 = time.monotonic()
    r = http.post(
        "/v1/chat/completions",
        json={"messages": [], "max_tokens": 1},
        headers={"x-mock-first-byte-delay-ms": "150"},
    )
    assert r.status_code == 200
    assert time.monotonic() - t0 >= 0.14
    t0 = time.monotonic()
    r = http.post(
        "/v1/chat/completions",
        json={"messages": [], "max_tokens": 5, "stream": True},
        headers={"x-mock-delay-ms": "30"},
    )
    assert r.text.count("tok") == 5
    assert time.monotonic() - t0 >= 0.2  # >= 7 events * 30 ms


def test_hang(base_url: str, http: httpx.Client) -> None:
    with httpx.Client(base_url=base_url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={"messages": []}, headers={"x-mock-hang": "1"})
    # the server is still fine afterwards
    assert http.get("/v1/models").status_code == 200

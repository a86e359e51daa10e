"""Every metered endpoint, through a real gateway, charged exactly: /v1/completions,
/v1/responses, /v1/embeddings (the openai SDK) and /v1/messages (Anthropic format)."""

from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest

from tests.e2e.conftest import LiveGateway

# bg-priced: $100/M input, $1000/M output.
IN = Decimal("0.0001")
OUT = Decimal("0.001")


def sdk(gw: LiveGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def only_entry(gw: LiveGateway, key_id: str) -> dict:
    [entry] = gw.wait_ledger(key_id, 1)
    gw.assert_settled(key_id)
    return entry


@pytest.mark.parametrize("stream", [False, True])
def test_completions(live: LiveGateway, stream: bool) -> None:
    key = live.create_key()
    client = sdk(live, key["key"])
    if stream:
        chunks = list(
            client.completions.create(
                model="bg-priced", prompt="alpha beta gamma", max_tokens=7, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == " ".join(
            f"tok{i}" for i in range(7)
        )
        # Not asked for: no usage-only chunk.
        assert all(c.usage is None and c.choices for c in chunks), chunks
    else:
        done = client.completions.create(model="bg-priced", prompt="alpha beta gamma", max_tokens=7)
        assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 7
    entry = only_entry(live, key["id"])
    assert entry["endpoint"] == "/completions"
    assert (entry["outcome"], entry["cost_source"], entry["stream"]) == ("ok", "prices", stream)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 7)
    assert entry["cost"] == 3 * IN + 7 * OUT


@pytest.mark.parametrize("stream", [False, True])
def test_responses(live: LiveGateway, stream: bool) -> None:
    key = live.create_key()
    client = sdk(live, key["key"])
    if stream:
        events = list(
            client.responses.create(
                model="bg-priced", input="one two three four", max_output_tokens=6, stream=True
            )
        )
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
        assert kinds.count("response.output_text.delta") == 6
        usage = events[-1].response.usage
        assert (usage.input_tokens, usage.output_tokens) == (4, 6)
    else:
        done = client.responses.create(
            model="bg-priced", input="one two three four", max_output_tokens=6
        )
        assert done.output_text == " ".join(f"tok{i}" for i in range(6))
    entry = only_entry(live, key["id"])
    assert entry["endpoint"] == "/responses"
    assert (entry["outcome"], entry["cost_source"], entry["stream"]) == ("ok", "prices", stream)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (4, 6)
    assert entry["cost"] == 4 * IN + 6 * OUT


def test_embeddings(live: LiveGateway) -> None:
    key = live.create_key()
    client = sdk(live, key["key"])
    done = client.embeddings.create(model="bg-priced", input=["one two three", "four five"])
    assert len(done.data) == 2 and done.usage.prompt_tokens == 5
    entry = only_entry(live, key["id"])
    assert entry["endpoint"] == "/embeddings"
    assert (entry["outcome"], entry["cost_source"], entry["stream"]) == ("ok", "prices", False)
    assert entry["prompt_tokens"] == 5
    assert entry["cost"] == 5 * IN


ANTHROPIC_BODY = {
    "model": "bg-priced",
    "system": "be brief",  # 2 words
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hi there you"}]}],
    "max_tokens": 8,
}


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_messages(live: LiveGateway, stream: bool) -> None:
    key = live.create_key()
    headers = {"x-api-key": key["key"], "anthropic-version": "2023-06-01"}
    body = {**ANTHROPIC_BODY, "stream": stream}
    if stream:
        with live.http.stream("POST", "/v1/messages", json=body, headers=headers) as r:
            assert r.status_code == 200, r.read()
            assert "x-budget-spend" in r.headers
            raw = r.read().decode()
        events = [json.loads(line[5:]) for line in raw.splitlines() if line.startswith("data:")]
        kinds = [e["type"] for e in events]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
        assert kinds.count("content_block_delta") == 8
        assert "event: error" not in raw
    else:
        r = live.http.post("/v1/messages", json=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["input_tokens"] == 5
        assert r.headers["x-budget-spend"] == "0.0085"
    entry = only_entry(live, key["id"])
    assert entry["endpoint"] == "/messages"
    assert (entry["outcome"], entry["cost_source"], entry["stream"]) == ("ok", "prices", stream)
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (5, 8)
    assert entry["cost"] == 5 * IN + 8 * OUT

"""budgetgate in front of a real LiteLLM proxy (SPEC 9): paths that LiteLLM would serve as its
own admin routes when they come with the master key are refused by the gateway and never
reach LiteLLM.

Each hostile target is first sent straight to LiteLLM with the master key (the control: what
the gateway's credential would buy), then through the gateway with a client key, over a raw
socket (HTTP clients normalise dot segments before sending). LiteLLM's access log shows every
request it received.

Run with `make test-litellm`; without BUDGETGATE_LITELLM_BIN every test here is skipped.
"""

from __future__ import annotations

import asyncio
import re

import httpx

from tests.hostile.raw import raw_http
from tests.litellm.conftest import MASTER_KEY, MODEL, BudgetGate, LiteLLM

# Request lines in LiteLLM's (uvicorn's) access log: `"POST /key/generate HTTP/1.1" 401`.
_ACCESS = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.1"')

HOSTILE: list[tuple[str, bytes]] = [
    ("POST", b"/v1/../key/generate"),
    ("POST", b"/v1/%2e%2e/key/generate"),
    ("POST", b"/key%2Fgenerate"),
    ("POST", b"/key/generate"),
    ("GET", b"/v1/models/../../key/list"),
    ("POST", b"/openai/../config/update"),
    ("GET", b"/health"),
    ("GET", b"/v2/key/info"),
    ("POST", b"/v1/chat/completions/../../../key/generate"),
]


def request_bytes(method: str, target: bytes, port: int, credential: str) -> bytes:
    body = b'{"models": ["gpt-4o-mini"]}' if method == "POST" else b""
    head = (
        f"{method} ".encode()
        + target
        + (
            f" HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nauthorization: Bearer {credential}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
    )
    return head + body


def seen_by_litellm(litellm: LiteLLM) -> list[str]:
    return [m.group(2) for m in _ACCESS.finditer(litellm.log_path.read_text(errors="replace"))]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_litellm_admin_routes_are_unreachable_through_the_gateway(
    litellm: LiteLLM, budgetgate: BudgetGate
) -> None:
    created = budgetgate.create_key(max_budget=1.0)
    key = created["key"]
    # The control: LiteLLM logs what it receives, and with the master key it takes these
    # paths as its own (anything but a 404 from its router).
    direct = asyncio.run(
        raw_http(port_of(litellm.url), request_bytes("POST", b"/key%2Fgenerate", 0, MASTER_KEY))
    )
    assert direct.status != 404, direct.text
    assert "/key%2Fgenerate" in seen_by_litellm(litellm) or "/key/generate" in seen_by_litellm(
        litellm
    )

    before = seen_by_litellm(litellm)
    port = port_of(budgetgate.url)
    for method, target in HOSTILE:
        r = asyncio.run(raw_http(port, request_bytes(method, target, port, key)))
        assert r.status in (400, 404), (target, r.status, r.text)
        assert r.json()["error"]["code"] in ("invalid_path", "route_not_found"), r.text
        assert MASTER_KEY not in r.text
    assert seen_by_litellm(litellm) == before
    assert budgetgate.ledger(created["id"]) == []

    # The same gateway does forward the routes it names.
    r = httpx.post(
        f"{budgetgate.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert seen_by_litellm(litellm)[len(before) :] == ["/v1/chat/completions"]

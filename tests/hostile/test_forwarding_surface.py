"""The forwarding surface, attacked (issue 12, "What it must show" 1-2; SPEC 9).

1. Hostile request targets -- dot segments raw and percent-encoded in every position, empty
   segments, encoded slashes and backslashes, `;` parameters, mixed case, trailing dots and
   slashes, encoded NUL / `?` / `#`, malformed and odd escapes, LiteLLM's admin and
   pass-through routes with and without `/v1` -- each get 400 `invalid_path` or 404
   `route_not_found` in the OpenAI error format, while carrying a valid key with budget left
   and a valid body; the upstream (a recording fake that sees the raw bytes) receives nothing
   and the ledger is unchanged. Sent twice: through a real uvicorn server over a raw socket
   (httpx would normalise the dot segments client-side), and to the ASGI app with a hand-built
   scope whose `raw_path` is the hostile bytes and `path` what uvicorn decodes.
2. Accepted targets reach the upstream byte for byte (request line recorded raw), with exactly
   one credential header.

Both key modes, SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from app.clock import ManualClock
from app.main import create_app
from app.server import head_timeout_protocol
from tests.conftest import ADMIN_KEY, START, UPSTREAM_KEY, make_settings, running_gateway
from tests.hostile.helpers import assert_reconciled
from tests.hostile.raw import (
    RawResponse,
    RecordingUpstream,
    asgi_call,
    build_request,
    raw_http,
)
from tests.keys.helpers import ERROR_KEYS
from tests.servers import ServerThread

PASSTHROUGH_KEY = "sk-litellm-client-key-0f3b9a7c1d2e4f5a"
CHAT = json.dumps(
    {"model": "bg-priced", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
).encode()

P, G = "POST", "GET"
IP, NF = "invalid_path", "route_not_found"

# (method, raw request target, expected status, expected error code)
HOSTILE: list[tuple[str, bytes, int, str]] = [
    # -- dot segments, raw, in every position
    (P, b"/v1/../key/generate", 400, IP),
    (P, b"/../key/generate", 400, IP),
    (P, b"/./v1/chat/completions", 400, IP),
    (P, b"/v1/./chat/completions", 400, IP),
    (P, b"/v1/chat/./completions", 400, IP),
    (P, b"/v1/chat/completions/.", 400, IP),
    (P, b"/v1/chat/completions/..", 400, IP),
    (P, b"/v1/chat/completions/../../key/generate", 400, IP),
    (G, b"/v1/models/../../key/list", 400, IP),
    (P, b"/openai/../key/generate", 400, IP),
    (P, b"/engines/../key/generate/chat/completions", 400, IP),
    (P, b"/engines/bg-priced/../../key/generate/chat/completions", 400, IP),
    (P, b"/openai/deployments/../../key/generate/chat/completions", 400, IP),
    # -- dot segments, percent-encoded (any case, half encoded)
    (P, b"/v1/%2e%2e/key/generate", 400, IP),
    (P, b"/v1/%2E%2E/key/generate", 400, IP),
    (P, b"/v1/.%2e/key/generate", 400, IP),
    (P, b"/v1/%2e./key/generate", 400, IP),
    (P, b"/%2e%2e/key/generate", 400, IP),
    (P, b"/v1/%2e/chat/completions", 400, IP),
    (P, b"/v1/chat/completions/%2e%2e/%2e%2e/key/generate", 400, IP),
    (P, b"/engines/%2e%2e/%2e%2e/key/generate/chat/completions", 400, IP),
    (P, b"/engines/bg-priced%2E/chat/completions", 400, IP),
    (P, b"/v1/chat/completions%2e", 400, IP),
    # -- empty segments, trailing slash
    (P, b"//key/generate", 400, IP),
    (P, b"//v1/chat/completions", 400, IP),
    (P, b"/v1//chat/completions", 400, IP),
    (P, b"/v1/chat//completions", 400, IP),
    (P, b"/v1/chat/completions/", 400, IP),
    (P, b"/v1/chat/completions//", 400, IP),
    (P, b"/engines//chat/completions", 400, IP),
    # -- encoded slashes (uvicorn decodes %2F: /key%2Fgenerate IS /key/generate to LiteLLM)
    (P, b"/key%2Fgenerate", 400, IP),
    (P, b"/key%2fgenerate", 400, IP),
    (P, b"/v1/chat%2Fcompletions", 400, IP),
    (P, b"/engines/x%2F..%2F..%2Fkey%2Fgenerate/chat/completions", 400, IP),
    (P, b"/engines/bg-priced%2Fchat%2Fcompletions%2F..%2F..%2F..%2Fkey%2Fgenerate", 400, IP),
    # -- backslashes, raw and encoded
    (P, b"/v1\\chat\\completions", 400, IP),
    (P, b"/v1/..\\key/generate", 400, IP),
    (P, b"/v1/chat%5ccompletions", 400, IP),
    (P, b"/v1/%5C..%5Ckey/generate", 400, IP),
    # -- NUL, control characters, encoded ? and #
    (P, b"/v1/chat/completions%00", 400, IP),
    (P, b"/v1/chat/completions%00/../../key/generate", 400, IP),
    (P, b"/v1/chat/completions%0d%0aX:y", 400, IP),
    (P, b"/v1/chat/completions%09", 400, IP),
    (P, b"/v1/chat/completions%7f", 400, IP),
    (P, b"/v1/chat/completions%3f", 400, IP),
    (P, b"/key/generate%3F/v1/chat/completions", 400, IP),
    (P, b"/v1/chat/completions%3Fkey=sk-smuggled", 400, IP),
    (P, b"/v1/chat/completions%23", 400, IP),
    (P, b"/key/generate%23/v1/chat/completions", 400, IP),
    # -- malformed and odd escapes
    (P, b"/v1/chat/completions%", 400, IP),
    (P, b"/v1/chat/completions%2", 400, IP),
    (P, b"/v1/chat/completions%zz", 400, IP),
    (P, b"/v1/chat/completions%%32%65", 400, IP),
    (P, b"/v1/%u002e%u002e/key/generate", 400, IP),
    (P, b"/v1/%252e%252e/key/generate", 400, IP),  # a dot once decoded twice
    (P, b"/engines/bg%252Dpriced/chat/completions", 400, IP),
    (P, b"/v1/%c0%ae%c0%ae/key/generate", 404, NF),  # overlong UTF-8 dots
    (P, b"/v1/chat/c%6Fmpletions", 404, NF),  # an encoded letter in a literal segment
    (P, b"/%76%31/chat/completions", 404, NF),
    # -- ; parameters, mixed case, trailing dots
    (P, b"/v1/chat/completions;x=1", 404, NF),
    (P, b"/v1;/chat/completions", 404, NF),
    (P, b"/v1/chat;/completions", 404, NF),
    (P, b"/key;/generate", 404, NF),
    (P, b"/V1/Chat/Completions", 404, NF),
    (P, b"/v1/CHAT/completions", 404, NF),
    (P, b"/Key/Generate", 404, NF),
    (P, b"/v1/chat/completions.", 404, NF),
    (P, b"/v1./chat/completions", 404, NF),
    (P, b"/key./generate", 404, NF),
    # -- LiteLLM admin routes, with and without /v1 and /v2
    (P, b"/key/generate", 404, NF),
    (P, b"/v1/key/generate", 404, NF),
    (G, b"/key/list", 404, NF),
    (G, b"/v1/key/list", 404, NF),
    (P, b"/key/update", 404, NF),
    (G, b"/v2/key/info", 404, NF),
    (P, b"/config/update", 404, NF),
    (P, b"/v1/config/update", 404, NF),
    (G, b"/health", 404, NF),
    (G, b"/v1/health", 404, NF),
    (G, b"/health/readiness", 404, NF),
    (P, b"/v1/mcp/x", 404, NF),
    (G, b"/spend/logs", 404, NF),
    (G, b"/v1/spend/logs", 404, NF),
    (P, b"/global/spend/reset", 404, NF),
    (P, b"/user/new", 404, NF),
    (P, b"/team/new", 404, NF),
    (P, b"/model/new", 404, NF),
    (G, b"/v1/model/info", 404, NF),
    (G, b"/model/info", 404, NF),
    (G, b"/routes", 404, NF),
    (P, b"/key/v1/batches", 404, NF),
    (G, b"/v1/agents", 404, NF),
    (G, b"/.well-known/litellm-ui-config", 404, NF),
    (P, b"/engines/key/generate", 404, NF),
    # -- LiteLLM pass-through and unlisted / refused API routes
    (P, b"/openai/v1/chat/completions", 404, NF),
    (P, b"/anthropic/v1/messages", 404, NF),
    (P, b"/v1beta/models/bg-priced:generateContent", 404, NF),
    (P, b"/v1/models/bg-priced:generateContent", 404, NF),  # models/{m} is GET only
    (P, b"/v1/engines/bg-priced/chat/completions", 404, NF),
    (P, b"/v1/files", 404, NF),
    (P, b"/v1/batches", 404, NF),
    (P, b"/v1/images/edits", 404, NF),
    (P, b"/v1/audio/transcriptions", 404, NF),
    (P, b"/v1/realtime", 404, NF),
    (P, b"/v1/fine_tuning/jobs", 404, NF),
    (P, b"/queue/chat/completions", 404, NF),
    (P, b"/openai/deployments/bg-priced/audio/transcriptions", 404, NF),
    (P, b"/openai/deployments/bg-priced/images/edits", 404, NF),
    (P, b"/engines/bg-priced/audio/speech", 404, NF),
    (P, b"/engines/bg-priced/responses", 404, NF),
    (P, b"/openai/v1/responses/compact", 404, NF),
    (P, b"/v1/responses/resp_1/cancel", 404, NF),
    (P, b"/v1/messages/count_tokens", 404, NF),
    (G, b"/v1/chat/completions", 404, NF),  # a metered route with another method
    ("PUT", b"/v1/chat/completions", 404, NF),
]


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """What uvicorn (httptools) puts in raw_path and query_string."""
    path, _, query = target.partition(b"?")
    return path, query


def key_body(key_mode: str, **budget: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"max_budget": 10.0, **budget}
    if key_mode == "passthrough":
        body["key"] = PASSTHROUGH_KEY
    return body


def expected_credential(key_mode: str, client_key: str) -> str:
    return f"Bearer {client_key if key_mode == 'passthrough' else UPSTREAM_KEY}"


def assert_error(r: RawResponse, status: int, code: str, what: object) -> None:
    assert r.status == status, (what, r.status, r.body[:300])
    assert r.headers.get("content-type", "").startswith("application/json"), (what, r.headers)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, (what, body)
    assert body["error"]["code"] == code, (what, body)


class Served:
    """A gateway served by a real uvicorn (the server stack a deployment runs), in a thread."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.port = server.port
        self.url = server.url

    async def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        async with httpx.AsyncClient(timeout=30) as c:
            return await c.request(
                method, self.url + path, headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kw
            )

    async def create_key(self, **body: Any) -> dict[str, Any]:
        r = await self.admin("POST", "/admin/keys", json=body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def state(self, key_id: str) -> tuple[float, float, int]:
        """spend, reserved, ledger entries."""
        key = (await self.admin("GET", f"/admin/keys/{key_id}")).json()
        entries = (await self.admin("GET", "/admin/ledger", params={"limit": 1000})).json()
        return key["spend"], key["reserved"], len(entries["data"])


@asynccontextmanager
async def served_gateway(
    database_url: str, upstream_url: str, key_mode: str, **settings: Any
) -> AsyncIterator[Served]:
    served = make_settings(database_url, upstream_url, key_mode=key_mode, **settings)
    app = create_app(served, ManualClock(START), run_scheduler=False, migrate=False)
    # The protocol `budgetgate serve` runs, with this gateway's body timeout.
    http = head_timeout_protocol(served.body_timeout_seconds)
    server = ServerThread(app, http=http).start()
    try:
        yield Served(server)
    finally:
        server.stop()


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}"), ("content-type", "application/json")]


def test_the_table_is_large_and_covers_each_kind() -> None:
    assert len(HOSTILE) >= 40
    targets = [t for _, t, _, _ in HOSTILE]
    assert len(set(zip([m for m, *_ in HOSTILE], targets, strict=True))) == len(HOSTILE)
    for needle in (b"/../", b"%2e%2e", b"%2E", b".%2e", b"//", b"%2F", b"%2f", b"\\", b"%5c",
                   b";", b"/V1/", b"%00", b"%3f", b"%23", b"/key/generate", b"/v2/key/info",
                   b"/v1/mcp/x", b"/spend/logs", b"/user/new", b"/team/new", b"/health",
                   b"/config/update", b"/key/list"):  # fmt: skip
        assert any(needle in t for t in targets), needle


# -- 1. hostile targets: through a real uvicorn, raw socket ----------------------------------


async def test_hostile_targets_through_uvicorn_are_refused_and_never_forwarded(
    database_url: str, recorder: RecordingUpstream, key_mode: str
) -> None:
    async with served_gateway(database_url, recorder.url, key_mode) as gw:
        created = await gw.create_key(**key_body(key_mode))
        key = created["key"]
        # Control: the harness sees a forwarded request (a valid one is forwarded and charged).
        ok = await raw_http(gw.port, build_request(P, b"/v1/chat/completions", auth(key), CHAT))
        assert ok.status == 200, ok.body
        assert [r.target for r in recorder.records] == [b"/v1/chat/completions"]
        recorder.clear()
        before = await gw.state(created["id"])
        assert before[0] > 0 and before[2] == 1

        for method, target, status, code in HOSTILE:
            body = CHAT if method == P else b""
            r = await raw_http(gw.port, build_request(method, target, auth(key), body))
            assert_error(r, status, code, target)
            assert recorder.records == [], (target, [x.request_line for x in recorder.records])

        assert await gw.state(created["id"]) == before


# -- 1. hostile targets: the ASGI app with a hand-built scope ----------------------------------


async def test_hostile_targets_in_the_asgi_scope_are_refused_and_never_forwarded(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        created = await gw.create_key(**key_body(key_mode))
        key = created["key"]
        ok = await asgi_call(gw.app, P, b"/v1/chat/completions", b"", auth(key), CHAT)
        assert ok.status == 200, ok.body
        assert len(recorder.records) == 1
        recorder.clear()
        before = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()
        entries = (await gw.admin("GET", "/admin/ledger")).json()["data"]

        for method, target, status, code in HOSTILE:
            raw_path, query = split_target(target)
            body = CHAT if method == P else b""
            r = await asgi_call(gw.app, method, raw_path, query, auth(key), body)
            assert_error(r, status, code, target)
            assert recorder.records == [], (target, [x.request_line for x in recorder.records])

        after = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()
        assert (after["spend"], after["reserved"]) == (before["spend"], before["reserved"])
        assert after["reserved"] == 0
        assert (await gw.admin("GET", "/admin/ledger")).json()["data"] == entries
        await assert_reconciled(gw)


async def test_path_decoded_differently_from_raw_path_is_judged_on_the_raw_bytes(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    """A server (or a caller) whose scope["path"] looks innocent while raw_path is hostile:
    the raw bytes are what is judged and forwarded, never `path`."""
    async with running_gateway(make_settings(sqlite_url, recorder.url), clock) as gw:
        key = (await gw.create_key(max_budget=10.0))["key"]
        for raw in (b"/v1/../key/generate", b"/key%2Fgenerate", b"/v1/chat/completions/"):
            r = await _asgi_with_path(gw.app, raw, "/v1/chat/completions", key)
            assert r.status == 400, (raw, r.body)
            assert r.json()["error"]["code"] == IP
        assert recorder.records == []


async def _asgi_with_path(app: Any, raw_path: bytes, path: str, key: str) -> RawResponse:
    messages: list[dict[str, Any]] = []
    done = False

    async def receive() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": CHAT, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(m: dict[str, Any]) -> None:
        messages.append(m)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": P,
        "scheme": "http", "path": path, "raw_path": raw_path, "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("gateway", 80), "state": {},
        "headers": [(b"host", b"gateway"), (b"authorization", f"Bearer {key}".encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(CHAT)).encode())],
    }  # fmt: skip
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return RawResponse(start["status"], {}, body)


# -- 2. accepted targets reach the upstream byte for byte -------------------------------------

# (method, target as sent, body) -- legitimate escapes in a model segment and in the query.
ACCEPTED: list[tuple[str, bytes, bytes]] = [
    (P, b"/v1/chat/completions", CHAT),
    (P, b"/chat/completions", CHAT),
    (P, b"/engines/bg%2Dpriced/chat/completions", CHAT),
    (P, b"/engines/bg%2dpriced/chat/completions?api-version=2024%2D02%2D01", CHAT),
    (P, b"/openai/deployments/bg-priced/chat/completions?api-version=2024-02-01&x=%20y", CHAT),
    (P, b"/openai/deployments/%62g-priced/chat/completions", CHAT),
    (P, b"/v1/chat/completions?foo=a%20b&bar=%2F%3F%23&baz=&q=a+b", CHAT),
    (P, b"/v1/chat/completions?model=bg-priced", CHAT),
    (P, b"/v1/chat/completions?model=bg%2Dpriced", CHAT),
    (G, b"/v1/models", b""),
    (G, b"/v1/models/bg%2Dpriced", b""),
    (G, b"/models?x=%7E", b""),
]


async def test_accepted_targets_reach_the_upstream_byte_for_byte_through_uvicorn(
    database_url: str, recorder: RecordingUpstream, key_mode: str
) -> None:
    async with served_gateway(database_url, recorder.url, key_mode) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        for method, target, body in ACCEPTED:
            recorder.clear()
            r = await raw_http(gw.port, build_request(method, target, auth(key), body))
            assert r.status == 200, (target, r.status, r.body[:300])
            assert len(recorder.records) == 1, target
            seen = recorder.records[0]
            assert seen.request_line == method.encode() + b" " + target + b" HTTP/1.1", (
                target,
                seen.request_line,
            )
            assert seen.credentials() == [("authorization", expected_credential(key_mode, key))], (
                target,
                seen.head_text(),
            )
            if method == P:
                assert json.loads(seen.body)["model"] == "bg-priced"


async def test_accepted_targets_reach_the_upstream_byte_for_byte_from_the_asgi_scope(
    sqlite_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(sqlite_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        created = await gw.create_key(**key_body(key_mode))
        key = created["key"]
        for method, target, body in ACCEPTED:
            recorder.clear()
            raw_path, query = split_target(target)
            r = await asgi_call(gw.app, method, raw_path, query, auth(key), body)
            assert r.status == 200, (target, r.status, r.body[:300])
            assert [x.request_line for x in recorder.records] == [
                method.encode() + b" " + target + b" HTTP/1.1"
            ]
            assert recorder.records[0].credentials() == [
                ("authorization", expected_credential(key_mode, key))
            ]
        # The model named by an encoded path is the model priced and recorded, decoded.
        entries = (await gw.admin("GET", "/admin/ledger")).json()["data"]
        assert entries and {e["model"] for e in entries} == {"bg-priced"}
        await assert_reconciled(gw)


# -- framing tricks through the real server ------------------------------------------------


async def test_websocket_upgrades_and_smuggled_framing_reach_no_admin_route(
    sqlite_url: str, recorder: RecordingUpstream
) -> None:
    """A WebSocket upgrade (LiteLLM's realtime / responses, with the key in
    Sec-WebSocket-Protocol) is never switched nor forwarded; a request whose body hides a
    second request behind Content-Length + Transfer-Encoding never makes the upstream see that
    second request."""
    async with served_gateway(sqlite_url, recorder.url, "managed") as gw:
        key = (await gw.create_key(max_budget=10.0))["key"]
        upgrade = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-protocol", f"realtime, openai-insecure-api-key.{key}"),
            ("authorization", f"Bearer {key}"),
        ]
        for target in (b"/v1/realtime?model=bg-priced", b"/v1/responses", b"/key/generate"):
            data = b"GET " + target + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            data += b"".join(f"{k}: {v}\r\n".encode() for k, v in upgrade) + b"\r\n"
            r = await raw_http(gw.port, data)
            assert r.status != 101 and 400 <= r.status < 500, (target, r.status, r.body)
        assert recorder.records == []

        smuggled = b"GET /key/list HTTP/1.1\r\nhost: x\r\n\r\n"
        for framing in (
            [("content-length", str(len(CHAT))), ("transfer-encoding", "chunked")],
            [("transfer-encoding", "chunked"), ("content-length", "4")],
            [("content-length", str(len(CHAT))), ("content-length", "0")],
        ):
            chunked = f"{len(CHAT):x}\r\n".encode() + CHAT + b"\r\n0\r\n\r\n"
            data = (
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                + f"authorization: Bearer {key}\r\ncontent-type: application/json\r\n".encode()
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in framing)
                + b"\r\n"
                + chunked
                + smuggled
            )
            try:
                await raw_http(gw.port, data, seconds=5)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass
        await asyncio.sleep(0.2)
        assert {r.target for r in recorder.records} <= {b"/v1/chat/completions"}, [
            r.request_line for r in recorder.records
        ]

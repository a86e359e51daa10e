"""Key handling (SPEC 2, 3, 7): the managed key format, shown once; the three ways to present
a key; the credential swap in managed mode and the unchanged forwarding in passthrough mode;
hop-by-hop headers; only the SHA-256 hash stored; no full key in any response or log."""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from app.clock import ManualClock
from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, Gateway, make_settings, running_gateway
from tests.keys.helpers import (
    all_database_text,
    assert_openai_error,
    bearer,
    key_object,
    ledger,
    mock_stats,
    upstream_requests,
)
from tests.servers import ServerThread, free_port

MANAGED_KEY = re.compile(r"sk-bg-[A-Za-z0-9_-]{32,}")
LITELLM_KEY = "sk-litellm-existing-123456"
CHAT = {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


# -- managed keys --------------------------------------------------------------------------


async def test_managed_key_format_and_shown_only_at_creation(gateway: Gateway) -> None:
    created = [await gateway.create_key(alias=f"k{i}", max_budget=1.0) for i in range(3)]
    keys = [c["key"] for c in created]
    assert len(set(keys)) == 3
    for c in created:
        assert MANAGED_KEY.fullmatch(c["key"]), c["key"]
        assert c["key"].startswith(c["key_prefix"])
        assert 6 < len(c["key_prefix"]) <= 16
        assert len(c["key"]) - len(c["key_prefix"]) >= 32  # the prefix gives little away

    k = created[0]
    texts = []
    for method, path, body in [
        ("GET", f"/admin/keys/{k['id']}", None),
        ("GET", "/admin/keys", None),
        ("GET", f"/admin/keys?alias={k['alias']}", None),
        ("PATCH", f"/admin/keys/{k['id']}", {"alias": "renamed"}),
        ("POST", f"/admin/keys/{k['id']}/reset", None),
        ("GET", f"/admin/keys/{k['id']}/periods", None),
        ("DELETE", f"/admin/keys/{k['id']}", None),
    ]:
        r = await gateway.admin(method, path, **({"json": body} if body else {}))
        assert r.status_code == 200, (path, r.text)
        texts.append(r.text + repr(r.headers))
        objs = r.json().get("data", [r.json()])
        for obj in objs:
            assert "key" not in obj, obj
    r = await gateway.client.get("/v1/budget", headers=bearer(keys[1]))
    assert r.status_code == 200, r.text
    assert "key" not in r.json()
    texts.append(r.text + repr(r.headers))
    blob = "\n".join(texts)
    for key in keys:
        assert key not in blob


async def test_key_accepted_in_each_header_and_swapped_for_the_upstream_credential(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = (await gateway.create_key(max_budget=1.0))["key"]
    request_ids = []
    for headers in (
        {"authorization": f"Bearer {key}"},
        {"authorization": f"bearer {key}"},
        {"api-key": key},
        {"x-api-key": key},
    ):
        before = await upstream_requests(mock_upstream.url)
        r = await gateway.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 200, (headers, r.text)
        stats = await mock_stats(mock_upstream.url)
        assert stats["requests"] == before + 1
        up = stats["last_headers"]
        assert up["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert "api-key" not in up and "x-api-key" not in up
        assert all(key not in v for v in up.values()), up
        assert up["x-request-id"] == r.headers["x-request-id"]
        request_ids.append(r.headers["x-request-id"])

    # Streamed and free requests get the same treatment.
    r = await gateway.client.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers={"x-api-key": key}
    )
    assert r.status_code == 200 and "[DONE]" in r.text
    up = (await mock_stats(mock_upstream.url))["last_headers"]
    assert up["authorization"] == f"Bearer {UPSTREAM_KEY}" and "x-api-key" not in up
    request_ids.append(r.headers["x-request-id"])
    r = await gateway.client.get("/v1/models/bg-test", headers={"api-key": key})
    assert r.status_code == 200, r.text
    echoed = r.json()["headers"]
    assert echoed["authorization"] == f"Bearer {UPSTREAM_KEY}" and "api-key" not in echoed
    assert echoed["x-request-id"] == r.headers["x-request-id"]

    # A client-chosen x-request-id is replaced by the gateway's own.
    r = await gateway.client.post(
        "/v1/chat/completions", json=CHAT, headers={**bearer(key), "x-request-id": "mine"}
    )
    up = (await mock_stats(mock_upstream.url))["last_headers"]
    assert up["x-request-id"] == r.headers["x-request-id"] != "mine"
    request_ids.append(r.headers["x-request-id"])

    assert len(set(request_ids)) == len(request_ids)
    assert {e["request_id"] for e in await ledger(gateway)} == set(request_ids)


async def test_hop_by_hop_headers_dropped_end_to_end_headers_kept(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = (await gateway.create_key(max_budget=1.0))["key"]
    sent = {
        **bearer(key),
        "connection": "keep-alive, x-hop-custom",
        "keep-alive": "timeout=5",
        "x-hop-custom": "must-not-pass",
        "te": "trailers",
        "trailer": "x-checksum",
        "upgrade": "h2c",
        "proxy-authorization": "Basic cHJveHk6c2VjcmV0",
        "proxy-authenticate": "Basic",
        "x-end-to-end": "kept",
        "openai-organization": "org-123",
        "user-agent": "test-agent/1.0",
    }
    for path in ("/v1/chat/completions", "/v1/models/bg-test"):
        if path.endswith("completions"):
            r = await gateway.client.post(path, json=CHAT, headers=sent)
        else:
            r = await gateway.client.get(path, headers=sent)
        assert r.status_code == 200, r.text
        up = (await mock_stats(mock_upstream.url))["last_headers"]
        for name in (
            "keep-alive",
            "x-hop-custom",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
        ):
            assert name not in up, (path, name, up)
        assert "x-hop-custom" not in up.get("connection", "")
        assert up["x-end-to-end"] == "kept"
        assert up["openai-organization"] == "org-123"
        assert up["user-agent"] == "test-agent/1.0"
        assert up["host"] == mock_upstream.url.removeprefix("http://")
    # Hop-by-hop headers never come back from the gateway either.
    for name in ("keep-alive", "transfer-encoding", "upgrade", "trailer"):
        assert name not in r.headers, r.headers


async def test_managed_key_stored_only_as_hash(gateway: Gateway) -> None:
    created = await gateway.create_key(alias="hashed", max_budget=1.0)
    assert (await gateway.chat(created["key"])).status_code == 200
    dump = await all_database_text(gateway)
    assert created["key"] not in dump
    assert hashlib.sha256(created["key"].encode()).hexdigest() in dump


async def test_managed_mode_refuses_a_given_key(gateway: Gateway) -> None:
    r = await gateway.admin("POST", "/admin/keys", json={"key": LITELLM_KEY, "max_budget": 1})
    err = assert_openai_error(r, 422, param="key", in_message=("passthrough",))
    assert LITELLM_KEY not in err["message"]
    assert (await gateway.admin("GET", "/admin/keys")).json()["data"] == []


# -- passthrough mode ----------------------------------------------------------------------


@pytest.fixture
async def passthrough(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> AsyncIterator[Gateway]:
    settings = make_settings(database_url, mock_upstream.url, key_mode="passthrough")
    async with running_gateway(settings, clock) as gw:
        yield gw


async def test_passthrough_registers_and_forwards_the_key_unchanged(
    passthrough: Gateway, mock_upstream: ServerThread
) -> None:
    gw = passthrough
    r = await gw.admin("POST", "/admin/keys", json={"max_budget": 1})
    assert_openai_error(r, 422, param="key", in_message=("key",))
    r = await gw.admin("POST", "/admin/keys", json={"key": "short", "max_budget": 1})
    assert_openai_error(r, 422, param="key")

    created = await gw.create_key(key=LITELLM_KEY, alias="litellm-team", max_budget=1.0)
    assert created["key_prefix"] != LITELLM_KEY and LITELLM_KEY.startswith(created["key_prefix"])
    assert created["mode"] == "passthrough"
    got = await key_object(gw, created["id"])
    assert "key" not in got and LITELLM_KEY not in str(got)
    # The same upstream key cannot be registered twice.
    r = await gw.admin("POST", "/admin/keys", json={"key": LITELLM_KEY, "max_budget": 5})
    err = assert_openai_error(r, 422, param="key")
    assert LITELLM_KEY not in err["message"]

    for headers in (bearer(LITELLM_KEY), {"x-api-key": LITELLM_KEY}, {"api-key": LITELLM_KEY}):
        before = await upstream_requests(mock_upstream.url)
        r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 200, r.text
        stats = await mock_stats(mock_upstream.url)
        assert stats["requests"] == before + 1
        up = stats["last_headers"]
        # Exactly one credential goes upstream, the budgeted key, however the client sent it.
        assert up["authorization"] == f"Bearer {LITELLM_KEY}", up
        assert "api-key" not in up and "x-api-key" not in up
        assert UPSTREAM_KEY not in str(up)
        assert up["x-request-id"] == r.headers["x-request-id"]
    r = await gw.client.get("/v1/models", headers=bearer(LITELLM_KEY))
    assert r.status_code == 200
    assert (await mock_stats(mock_upstream.url))["last_headers"]["authorization"] == (
        f"Bearer {LITELLM_KEY}"
    )
    got = await key_object(gw, created["id"])
    assert got["spend"] == 0.009  # three chats of 3 output tokens at $0.001

    # Unknown keys: 401, nothing forwarded.
    before = await upstream_requests(mock_upstream.url)
    for headers in (
        bearer("sk-litellm-not-registered-999"),
        {"x-api-key": LITELLM_KEY + "x"},
        {},
    ):
        r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert_openai_error(r, 401, type="authentication_error")
        r = await gw.client.get("/v1/models", headers=headers)
        assert_openai_error(r, 401, type="authentication_error")
    assert await upstream_requests(mock_upstream.url) == before

    # Only the SHA-256 hash is stored, in any column of any table.
    dump = await all_database_text(gw)
    assert LITELLM_KEY not in dump
    assert hashlib.sha256(LITELLM_KEY.encode()).hexdigest() in dump


async def test_passthrough_budget_enforced_on_the_hash(
    passthrough: Gateway, mock_upstream: ServerThread
) -> None:
    created = await passthrough.create_key(key=LITELLM_KEY, max_budget=0.003)
    assert (await passthrough.chat(LITELLM_KEY, max_tokens=3)).status_code == 200
    before = await upstream_requests(mock_upstream.url)
    r = await passthrough.chat(LITELLM_KEY, max_tokens=3)
    err = assert_openai_error(r, 429, type="budget_exceeded")
    assert LITELLM_KEY not in err["message"] and created["key_prefix"] in err["message"]
    assert await upstream_requests(mock_upstream.url) == before
    # Revoked: 401 from then on.
    assert (await passthrough.admin("DELETE", f"/admin/keys/{created['id']}")).status_code == 200
    assert_openai_error(await passthrough.chat(LITELLM_KEY), 401, in_message=("revoked",))


# -- secrecy: responses and logs -----------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.stream = io.StringIO()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")
        if record.exc_info:
            self.stream.write(str(record.exc_info[1]) + "\n")
        self.stream.write(repr(record.args) + "\n")


async def test_no_full_key_in_any_response_or_log(
    database_url: str,
    mock_upstream: ServerThread,
    clock: ManualClock,
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(database_url, mock_upstream.url, log_level="debug")
    capture = _Capture()
    root = logging.getLogger()
    old_root_level = root.level
    responses: list[httpx.Response] = []
    async with running_gateway(settings, clock) as gw:
        # Attached after the lifespan configured logging (which replaces the handlers of the
        # non-propagating "budgetgate" logger); the root handler sees every other library.
        bg = logging.getLogger("budgetgate")
        assert bg.level == logging.DEBUG
        bg.addHandler(capture)
        root.addHandler(capture)
        root.setLevel(logging.DEBUG)
        try:
            ok = await gw.create_key(alias="ok", max_budget=1.0, models=["bg-test"])
            broke = await gw.create_key(alias="broke", max_budget=0)
            gone = await gw.create_key(alias="gone", max_budget=1.0)
            old = await gw.create_key(
                alias="old",
                max_budget=1.0,
                expires_at=(clock.now() + timedelta(seconds=1)).isoformat(),
            )
            keys = [ok["key"], broke["key"], gone["key"], old["key"]]
            await gw.admin("DELETE", f"/admin/keys/{gone['id']}")
            clock.advance(5)
            k = ok["key"]
            calls = [
                gw.chat(k),  # 200
                gw.chat(k, stream=True),  # 200 streamed
                gw.chat(k, model="bg-priced"),  # 403
                gw.chat(k, model="unpriced-model"),  # 403 (allow-list first) or 400
                gw.chat(broke["key"]),  # 429
                gw.chat(broke["key"], model="unpriced-model"),  # 400 unpriced
                gw.chat(gone["key"]),  # 401 revoked
                gw.chat(old["key"]),  # 401 expired
                gw.chat(k + "x"),  # 401 unknown
                gw.client.post("/v1/chat/completions", content=b"{bad", headers=bearer(k)),
                gw.client.post("/v1/files", content=b"x", headers=bearer(broke["key"])),  # 404
                gw.client.get("/v1/models", headers={"x-api-key": k}),
                gw.client.get("/v1/budget", headers={"api-key": k}),
                gw.client.get("/v1/budget", headers=bearer(gone["key"])),
                gw.client.post(
                    "/v1/chat/completions", json=CHAT, headers={**bearer(k), "x-mock-status": "500"}
                ),
                gw.client.post(
                    "/v1/chat/completions", json=CHAT, headers={**bearer(k), "x-mock-status": "401"}
                ),
                gw.client.get("/admin/keys", headers=bearer(k)),  # client key on admin: 401
                gw.admin("GET", "/admin/keys"),
                gw.admin("GET", "/admin/ledger"),
            ]
            for call in calls:
                responses.append(await call)
            logging.getLogger("budgetgate.proxy").debug("capture-canary")
        finally:
            root.removeHandler(capture)
            root.setLevel(old_root_level)
            bg.removeHandler(capture)

    statuses = sorted({r.status_code for r in responses})
    assert statuses == [200, 400, 401, 403, 404, 429, 500], statuses
    texts = "\n".join(
        r.text + "\n" + "\n".join(f"{n}: {v}" for n, v in r.headers.multi_items())
        for r in responses
    )
    out, err = capfd.readouterr()
    logs = capture.stream.getvalue() + out + err
    # The capture works: a budgetgate record reaches both the handler and stderr.
    assert "capture-canary" in capture.stream.getvalue() and "capture-canary" in err
    for key in keys:
        assert key not in texts
        assert key not in logs
    for secret in (UPSTREAM_KEY, ADMIN_KEY):
        assert secret not in texts
        assert secret not in logs


async def test_upstream_credential_never_in_an_error_response(
    database_url: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, f"http://127.0.0.1:{free_port()}")
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(max_budget=1.0))["key"]
        for r in (
            await gw.chat(key),
            await gw.client.get("/v1/models", headers=bearer(key)),
            await gw.client.post(
                "/v1/embeddings", json={"model": "bg-test", "input": "x"}, headers=bearer(key)
            ),
        ):
            assert_openai_error(r, 502)
            everything = r.text + repr(r.headers.multi_items())
            assert UPSTREAM_KEY not in everything and key not in everything

"""Hostile credentials on the proxy: unknown, revoked and expired keys in all three header
forms, malformed Authorization headers, oversized and non-ASCII keys, CR/LF/NUL injection and
duplicated credential headers. Every one is a 401 (or a 400) in the OpenAI error format, never
names the key, and nothing is forwarded or recorded."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from app.clock import ManualClock
from tests.conftest import Gateway, make_settings, running_gateway
from tests.hostile.helpers import (
    METERED,
    VALID,
    assert_client_error,
    assert_reconciled,
    dumps,
    ledger_state,
)
from tests.keys.helpers import assert_openai_error, key_object, ledger, mock_stats
from tests.servers import ServerThread

Headers = list[tuple[str, str]] | list[tuple[bytes, bytes]]


def header_forms(key: str) -> list[list[tuple[str, str]]]:
    return [[("authorization", f"Bearer {key}")], [("api-key", key)], [("x-api-key", key)]]


# (method, path, body) for a metered, a non-metered, the free and the client-info route.
ROUTES: list[tuple[str, str, bytes | None]] = [
    *(("POST", p, dumps(VALID[p])) for p in METERED),
    ("POST", "/chat/completions", dumps(VALID["/v1/chat/completions"])),  # without /v1
    ("POST", "/v1/files", b"data"),
    ("GET", "/v1/models", None),
    ("GET", "/v1/budget", None),
]


async def send(gw: Gateway, method: str, path: str, body: bytes | None, headers: Headers) -> Any:
    return await gw.client.request(method, path, content=body, headers=headers)


async def assert_refused_everywhere(
    gw: Gateway,
    headers: Headers,
    *statuses: int,
    secret: str | None = None,
    code: str = "invalid_api_key",
) -> None:
    for method, path, body in ROUTES:
        r = await send(gw, method, path, body, headers)
        err = assert_client_error(r, *(statuses or (401,)))
        if r.status_code == 401:
            assert err["type"] == "authentication_error", err
            assert err["code"] == code, err
        if secret is not None:
            assert secret not in r.text and secret not in str(r.headers)
        assert not any(h.startswith("x-budget-") for h in r.headers), (headers, r.headers)


async def test_unknown_revoked_and_expired_keys_in_every_header_form(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    live = await gateway.create_key(max_budget=10.0)
    revoked = await gateway.create_key(alias="revoked", max_budget=10.0)
    expiring = await gateway.create_key(
        alias="expiring",
        max_budget=10.0,
        expires_at=(gateway.clock.now() + timedelta(minutes=5)).isoformat(),
    )
    # The control: each form of each key works before it is revoked / expired.
    for key in (live, revoked, expiring):
        for headers in header_forms(key["key"]):
            r = await send(gateway, *ROUTES[0], headers)
            assert r.status_code == 200, (headers, r.text)
    assert (await gateway.admin("DELETE", f"/admin/keys/{revoked['id']}")).status_code == 200
    gateway.clock.advance(timedelta(minutes=5))

    before = await ledger_state(gateway, live["id"], mock_upstream.url)
    unknown = "sk-bg-" + "Z" * 43
    near_miss = live["key"][:-1] + ("A" if live["key"][-1] != "A" else "B")
    cases = [
        (unknown, ()),
        (near_miss, ()),
        (live["key"][:-1], ()),
        (live["key"] + "x", ()),
        (live["key"].upper(), ()),
        (revoked["key"], ("revoked",)),
        (expiring["key"], ("expired",)),
    ]
    for secret, words in cases:
        for headers in header_forms(secret):
            await assert_refused_everywhere(gateway, headers, secret=secret)
            r = await send(gateway, *ROUTES[0], headers)
            for word in words:
                assert word in r.json()["error"]["message"], (word, r.text)
    assert await ledger_state(gateway, live["id"], mock_upstream.url) == before
    await assert_reconciled(gateway)


async def test_malformed_authorization_headers_are_401(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    live = await gateway.create_key(max_budget=10.0)
    k = live["key"]
    before = await ledger_state(gateway, live["id"], mock_upstream.url)
    malformed: list[str] = [
        "Bearer",
        "Bearer ",
        "Bearer  ",
        "Bearer \t ",
        "bearer",
        "Basic xyz",
        f"Basic {k}",
        f"Token {k}",
        f"Bearer{k}",  # no separator
        f"Bearer\t{k}",  # a tab is not the separator
        f"Bearer {k} extra",
        f"Bearer {k},Bearer {k}",
        f"{k}",  # the bare key, no scheme
        f"Bearer Bearer {k}",
        "Bearer " + "A" * 60_000,  # a 60 KB key (a head over 64 KB is a 431: test_body_before_auth)
        "Bearer " + "sk-bg-" + "ключ" * 10,  # non-ASCII (sent as UTF-8 bytes)
        "Bearer sk-bg-\u00e9\u00e8\u00ea",  # Latin-1 range
        f"Bearer {k[:10]}\u2026",  # the display prefix plus an ellipsis
    ]
    for value in malformed:
        raw = value.encode("utf-8")
        await assert_refused_everywhere(gateway, [(b"authorization", raw)], secret=k)
    # A malformed Authorization is not rescued by a valid key in another header: two
    # credentials, one the gateway cannot budget (an upstream may read it first).
    for value in ("Basic xyz", "Bearer", "Bearer  "):
        await assert_refused_everywhere(
            gateway,
            [("authorization", value), ("x-api-key", k)],
            secret=k,
            code="ambiguous_credentials",
        )
    # Very long and non-ASCII keys in the other two forms.
    for name in ("api-key", "x-api-key"):
        for value in ("A" * 60_000, "sk-bg-ключ", " ", "\t"):
            await assert_refused_everywhere(gateway, [(name.encode(), value.encode())])
    assert await ledger_state(gateway, live["id"], mock_upstream.url) == before


async def test_header_injection_is_refused_and_nothing_forwarded(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """CR, LF and NUL inside header values (which an HTTP/1.1 server never passes on, but the
    ASGI interface can): refused before admission (401 for the credential itself, 400 for any
    other header with a valid key), nothing forwarded, nothing reserved."""
    live = await gateway.create_key(max_budget=10.0, budget_duration="1d")
    k = live["key"]
    before = await ledger_state(gateway, live["id"], mock_upstream.url)
    for sep in (b"\r\n", b"\n", b"\r", b"\x00"):
        injected = sep + b"x-injected: 1"
        # In the credential: not the key.
        for name, value in (
            (b"authorization", b"Bearer " + k.encode() + injected),
            (b"api-key", k.encode() + injected),
            (b"x-api-key", k.encode() + injected),
        ):
            await assert_refused_everywhere(gateway, [(name, value)])
        # In another header, with a valid key: 400, never a 500 or a leaked reservation.
        for name, value in (
            (b"x-foo", b"a" + injected),
            (b"x-injected" + sep + b"x-evil", b"1"),
            (b"openai-organization", b"org" + injected),
            (b"content-type", b"application/json" + injected),
        ):
            for method, path, body in ROUTES:
                r = await send(
                    gateway,
                    method,
                    path,
                    body,
                    [(b"authorization", b"Bearer " + k.encode()), (name, value)],
                )
                if path == "/v1/budget":  # the gateway's own route forwards nothing
                    assert r.status_code in (200, 400), r.text
                    continue
                err = assert_client_error(r, 400)
                assert "CR, LF or NUL" in err["message"], err
                assert r.headers["x-request-id"].startswith("req_")
    after = await ledger_state(gateway, live["id"], mock_upstream.url)
    assert after == before
    assert "x-injected" not in (await mock_stats(mock_upstream.url)).get("last_headers", {})
    await assert_reconciled(gateway)


async def test_duplicated_credential_headers_are_401(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """Two different values for one credential header are ambiguous (SPEC 9): refused,
    whatever the order; the same value twice is one credential."""
    a = await gateway.create_key(max_budget=10.0)
    b = await gateway.create_key(max_budget=10.0)
    before = await ledger_state(gateway, a["id"], mock_upstream.url)
    for name in ("authorization", "api-key", "x-api-key"):
        fmt = "Bearer {}" if name == "authorization" else "{}"
        for first, second in (
            (a["key"], "sk-bg-other"),
            ("sk-bg-other", a["key"]),
            (a["key"], b["key"]),
        ):
            headers = [(name, fmt.format(first)), (name, fmt.format(second))]
            await assert_refused_everywhere(gateway, headers, code="ambiguous_credentials")
    assert await ledger_state(gateway, a["id"], mock_upstream.url) == before
    for name in ("authorization", "api-key", "x-api-key"):
        value = f"Bearer {a['key']}" if name == "authorization" else a["key"]
        r = await send(gateway, *ROUTES[0], [(name, value), (name, value)])
        assert r.status_code == 200, r.text
    # One header of each kind, all the same key: fine (some clients send two forms).
    r = await send(
        gateway,
        *ROUTES[0],
        [("authorization", f"Bearer {a['key']}"), ("x-api-key", a["key"])],
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("order", ["registered-first", "registered-last"])
async def test_passthrough_duplicate_authorization_never_forwards_an_unbudgeted_key(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock, order: str
) -> None:
    """Passthrough mode forwards the client's credential: with two Authorization headers the
    gateway must not budget one key and let the upstream see another."""
    settings = make_settings(database_url, mock_upstream.url, key_mode="passthrough")
    async with running_gateway(settings, clock) as gw:
        registered = "sk-litellm-registered-0123456789"
        unbudgeted = "sk-litellm-not-registered-987654"
        key = await gw.create_key(max_budget=10.0, key=registered)
        ok = await send(gw, *ROUTES[0], [("authorization", f"Bearer {registered}")])
        assert ok.status_code == 200, ok.text
        assert (await mock_stats(mock_upstream.url))["last_headers"]["authorization"] == (
            f"Bearer {registered}"
        )
        pair = [registered, unbudgeted] if order == "registered-first" else [unbudgeted, registered]
        before = await ledger_state(gw, key["id"], mock_upstream.url)
        for method, path, body in ROUTES:
            r = await send(gw, method, path, body, [("authorization", f"Bearer {v}") for v in pair])
            assert_client_error(r, 401)
        assert await ledger_state(gw, key["id"], mock_upstream.url) == before


async def test_unexpected_failure_sending_upstream_releases_the_reservation(
    gateway: Gateway, mock_upstream: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever makes the upstream send fail after admission (here what aiohttp raises for a
    header it refuses to write), the request is settled at once -- a 500 in the OpenAI format,
    one `upstream_error` entry charged 0 -- not left reserved until the sweeper's TTL."""
    key = await gateway.create_key(max_budget=10.0, budget_duration="1d")
    upstream = gateway.state.gateway.upstream

    async def refuse(*_args: object, **_kwargs: object) -> None:
        raise ValueError("Newline or carriage return character detected in HTTP header")

    monkeypatch.setattr(upstream, "send", refuse)
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    for method, path, body in ROUTES[:6]:
        r = await send(gateway, method, path, body, [("authorization", f"Bearer {key['key']}")])
        assert r.status_code == 500, r.text
        err = assert_openai_error(r, 500, type="server_error", code="internal_error")
        assert "Newline" not in err["message"]
        got = await key_object(gateway, key["id"])
        assert (got["reserved"], got["spend"]) == (0, 0), (path, got)
    after = await ledger_state(gateway, key["id"], mock_upstream.url)
    assert after.upstream == before.upstream
    assert after.reservations == 0
    entries = await ledger(gateway, key["id"])
    assert [(e["outcome"], e["cost"]) for e in entries] == [("upstream_error", 0)] * 6
    await assert_reconciled(gateway)

"""Credential smuggling (issue 12, "What it must show" 3; SPEC 9): whatever credential headers a
client sends -- every ordered pair of credential-bearing headers, `Connection` naming each
header, duplicated headers, credentials in the query -- the upstream (a recording fake that
sees the raw header block) receives exactly one credential, `Authorization: Bearer` with the
budgeted key (passthrough) or the gateway's upstream key (managed), and no other copy of any
key; or the client gets 401/400 and nothing is forwarded. Client-sent forwarding headers are
replaced by the gateway's own. Both key modes, SQLite and PostgreSQL.
"""

from __future__ import annotations

import itertools
import json

from app.clock import ManualClock
from tests.conftest import UPSTREAM_KEY, Gateway, make_settings, running_gateway
from tests.hostile.raw import Recorded, RecordingUpstream, build_request, raw_http
from tests.hostile.test_forwarding_surface import (
    PASSTHROUGH_KEY,
    expected_credential,
    key_body,
    served_gateway,
)
from tests.keys.helpers import assert_openai_error

SMUGGLED = "sk-smuggled-unbudgeted-key-9d8c7b6a5f4e"
CHAT = json.dumps(
    {"model": "bg-priced", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
)

# Where the gateway reads the client's key (SPEC 2, 9).
CLIENT_KEY_HEADERS = ("authorization", "api-key", "x-api-key")
# Every other header an upstream may read a credential from, and their underscore variants.
OTHER_CREDENTIAL_HEADERS = (
    "x-litellm-api-key",
    "x-goog-api-key",
    "ocp-apim-subscription-key",
    "proxy-authorization",
    "cookie",
    "litellm_user_api_key",
    "litellm-user-api-key",
    "sec-websocket-protocol",
    "x_litellm_api_key",
    "x_api_key",
    "api_key",
    "x_goog_api_key",
)
ALL_HEADERS = CLIENT_KEY_HEADERS + OTHER_CREDENTIAL_HEADERS


def carrying(header: str, key: str) -> str:
    """`key` as a client would put it in `header`."""
    if header in ("authorization", "proxy-authorization", "x-litellm-api-key"):
        return f"Bearer {key}"
    if header == "cookie":
        return f"token={key}; litellm_token={key}"
    if header == "sec-websocket-protocol":
        return f"openai-insecure-api-key.{key}"
    return key


def assert_one_credential(seen: Recorded, key_mode: str, key: str, what: object) -> None:
    assert seen.credentials() == [("authorization", expected_credential(key_mode, key))], (
        what,
        seen.head_text(),
    )
    head = seen.head_text()
    assert SMUGGLED not in head, (what, head)
    if key_mode == "managed":
        assert key not in head, (what, head)  # the budgetgate key never goes upstream
    else:
        assert head.count(key) == 1, (what, head)
        assert UPSTREAM_KEY not in head, (what, head)


async def post(gw: Gateway, headers: list[tuple[str, str]], path: str = "/v1/chat/completions"):  # noqa: ANN201
    return await gw.client.post(
        path, content=CHAT, headers=[("content-type", "application/json"), *headers]
    )


async def test_every_pair_of_credential_headers(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    """The budgeted key in header a, another key in header b (both orders)."""
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        created = await gw.create_key(**key_body(key_mode))
        key = created["key"]
        forwarded = refused = 0
        for a, b in itertools.permutations(ALL_HEADERS, 2):
            recorder.clear()
            sent = [(a, carrying(a, key)), (b, carrying(b, SMUGGLED))]
            r = await post(gw, sent)
            if a in CLIENT_KEY_HEADERS and b in CLIENT_KEY_HEADERS:
                assert_openai_error(r, 401, code="ambiguous_credentials")
            elif a not in CLIENT_KEY_HEADERS and b in CLIENT_KEY_HEADERS:
                # The gateway reads the smuggled key, which it does not know.
                assert_openai_error(r, 401)
            elif a not in CLIENT_KEY_HEADERS:
                assert_openai_error(r, 401)  # no key where the gateway reads one
            else:
                assert r.status_code == 200, (sent, r.text)
                assert len(recorder.records) == 1
                assert_one_credential(recorder.records[0], key_mode, key, sent)
                forwarded += 1
                continue
            refused += 1
            assert recorder.records == [], (sent, recorder.records[0].head_text())
        assert forwarded == len(CLIENT_KEY_HEADERS) * len(OTHER_CREDENTIAL_HEADERS)
        assert refused > forwarded
        # The smuggled key was never budgeted nor seen by anyone.
        spend = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()["spend"]
        assert spend > 0


async def test_the_same_key_in_two_client_headers_is_forwarded_once(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        for a, b in itertools.combinations(CLIENT_KEY_HEADERS, 2):
            recorder.clear()
            sent = [(a, carrying(a, key)), (b, carrying(b, key))]
            r = await post(gw, sent)
            assert r.status_code == 200, (sent, r.text)
            assert_one_credential(recorder.records[0], key_mode, key, sent)


async def test_duplicated_credential_headers(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        # The same client header twice: same value is one key; different values are ambiguous.
        for h in CLIENT_KEY_HEADERS:
            recorder.clear()
            r = await post(gw, [(h, carrying(h, key)), (h, carrying(h, key))])
            assert r.status_code == 200, (h, r.text)
            assert_one_credential(recorder.records[0], key_mode, key, h)
            for pair in ([key, SMUGGLED], [SMUGGLED, key]):
                recorder.clear()
                r = await post(gw, [(h, carrying(h, pair[0])), (h, carrying(h, pair[1]))])
                assert_openai_error(r, 401, code="ambiguous_credentials")
                assert recorder.records == []
        # Authorization with another scheme beside a key: the upstream might read it first.
        for other in ("Basic c2stc211Z2dsZWQ6", "AWS4-HMAC-SHA256 Credential=" + SMUGGLED):
            for h in ("api-key", "x-api-key"):
                recorder.clear()
                r = await post(gw, [(h, key), ("authorization", other)])
                assert_openai_error(r, 401, code="ambiguous_credentials")
                assert recorder.records == []
        # Other credential headers duplicated (and comma-joined) never cross.
        for h in OTHER_CREDENTIAL_HEADERS:
            recorder.clear()
            sent = [
                ("authorization", f"Bearer {key}"),
                (h, carrying(h, SMUGGLED)),
                (h, carrying(h, SMUGGLED) + ", " + SMUGGLED),
            ]
            r = await post(gw, sent)
            assert r.status_code == 200, (h, r.text)
            assert_one_credential(recorder.records[0], key_mode, key, sent)


# Headers `Connection` can name: every credential header, the ones the gateway sets itself, and
# a harmless one as the control.
CONNECTION_NAMES = (
    *ALL_HEADERS,
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "accept-encoding",
    "content-type",
)


async def test_connection_cannot_drop_the_gateway_credential_or_protect_a_smuggled_one(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        for named in CONNECTION_NAMES:
            for client_header in CLIENT_KEY_HEADERS:
                recorder.clear()
                sent = [(client_header, carrying(client_header, key)), ("connection", named)]
                if named not in CLIENT_KEY_HEADERS and named in ALL_HEADERS:
                    sent.append((named, carrying(named, SMUGGLED)))
                r = await post(gw, sent)
                assert r.status_code == 200, (sent, r.text)
                seen = recorder.records[0]
                assert_one_credential(seen, key_mode, key, sent)
                assert seen.header_values("x-forwarded-for") == ["127.0.0.1"], seen.head_text()
                assert len(seen.header_values("x-request-id")) == 1, seen.head_text()
                assert seen.header_values("x-request-id") == [r.headers["x-request-id"]]
        # Several names in one Connection header, and several Connection headers.
        recorder.clear()
        sent = [
            ("api-key", key),
            ("connection", "authorization, x-api-key,api-key"),
            ("connection", "x-litellm-api-key"),
            ("x-litellm-api-key", SMUGGLED),
        ]
        r = await post(gw, sent)
        assert r.status_code == 200, r.text
        assert_one_credential(recorder.records[0], key_mode, key, sent)


async def test_connection_and_smuggled_headers_through_a_real_server(
    database_url: str, recorder: RecordingUpstream, key_mode: str
) -> None:
    """The same over a raw socket to uvicorn: what a real HTTP/1.1 parser hands the app."""
    async with served_gateway(database_url, recorder.url, key_mode) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        cases = [
            [("api-key", key), ("connection", "authorization"), ("x-litellm-api-key", SMUGGLED)],
            [("authorization", f"Bearer {key}"), ("Connection", "Authorization")],
            [("X-Api-Key", key), ("X-LiteLLM-API-Key", SMUGGLED), ("x_litellm_api_key", SMUGGLED)],
            [("authorization", f"Bearer {key}"), ("litellm_user_api_key", SMUGGLED),
             ("Cookie", f"k={SMUGGLED}"), ("Proxy-Authorization", f"Bearer {SMUGGLED}")],
        ]  # fmt: skip
        for headers in cases:
            recorder.clear()
            r = await raw_http(
                gw.port,
                build_request(
                    "POST",
                    b"/v1/chat/completions",
                    [("content-type", "application/json"), *headers],
                    CHAT.encode(),
                ),
            )
            assert r.status == 200, (headers, r.body)
            assert_one_credential(recorder.records[0], key_mode, key, headers)
        # Two different keys: refused before anything is forwarded.
        recorder.clear()
        r = await raw_http(
            gw.port,
            build_request(
                "POST",
                b"/v1/chat/completions",
                [("authorization", f"Bearer {key}"), ("Authorization", f"Bearer {SMUGGLED}")],
                CHAT.encode(),
            ),
        )
        assert r.status == 401 and r.json()["error"]["code"] == "ambiguous_credentials"
        assert recorder.records == []


QUERY_CREDENTIALS = [
    f"key={SMUGGLED}",
    f"api_key={SMUGGLED}",
    f"api-key={SMUGGLED}",
    f"litellm_user_api_key={SMUGGLED}",
    f"KEY={SMUGGLED}",
    f"%6Bey={SMUGGLED}",
    f"api%5Fkey={SMUGGLED}",
    f"x=1&key={SMUGGLED}",
    "key=",
    "key",
]


async def test_credentials_and_other_models_in_the_query_are_refused(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        auth = [("authorization", f"Bearer {key}")]
        for path in ("/v1/chat/completions", "/engines/bg-priced/chat/completions"):
            for query in QUERY_CREDENTIALS:
                r = await gw.client.post(
                    f"{path}?{query}",
                    content=CHAT,
                    headers=[("content-type", "application/json"), *auth],
                )
                assert_openai_error(r, 400, code="invalid_query")
                assert SMUGGLED not in r.text
            for query in ("model=bg-test", "model=bg-priced&model=bg-test", "model=BG-PRICED"):
                r = await gw.client.post(
                    f"{path}?{query}",
                    content=CHAT,
                    headers=[("content-type", "application/json"), *auth],
                )
                assert_openai_error(r, 400, code="invalid_query", param="model")
        # Free routes take no credential in the query either.
        r = await gw.client.get(f"/v1/models?key={SMUGGLED}", headers=auth)
        assert_openai_error(r, 400, code="invalid_query")
        assert recorder.records == []
        # The control: a harmless query is forwarded as sent.
        r = await gw.client.post(
            "/v1/chat/completions?model=bg-priced&user=x",
            content=CHAT,
            headers=[("content-type", "application/json"), *auth],
        )
        assert r.status_code == 200, r.text
        assert recorder.records[0].target == b"/v1/chat/completions?model=bg-priced&user=x"


# What the gateway replaces (SPEC 9: set from what it saw, never taken from the client).
FORWARDING = [
    ("x-forwarded-for", "6.6.6.6"),
    ("X-Forwarded-For", "7.7.7.7"),
    ("x-forwarded-host", "evil.example"),
    ("x-forwarded-proto", "gopher"),
    ("forwarded", "for=6.6.6.6;host=evil.example;proto=gopher"),
    ("x-real-ip", "6.6.6.6"),
]
# The rest of the x-forwarded-* family (issue 12: "Managed mode also drops client-sent
# `x-forwarded-*` and sets its own"): uvicorn/Starlette/werkzeug-style proxies and apps read
# x-forwarded-port/-prefix (root path!), -server, -scheme, -ssl.
OTHER_X_FORWARDED = [
    ("x-forwarded-port", "6666"),
    ("x-forwarded-prefix", "/key/generate"),
    ("x-forwarded-server", "evil.example"),
    ("x-forwarded-scheme", "gopher"),
    ("x-forwarded-ssl", "on"),
    ("x-forwarded-uri", "/key/generate"),
    ("x-original-forwarded-for", "6.6.6.6"),
]


async def test_client_forwarding_headers_are_replaced_by_the_gateways(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        r = await post(gw, [("authorization", f"Bearer {key}"), *FORWARDING])
        assert r.status_code == 200, r.text
        seen = recorder.records[0]
        head = seen.head_text()
        for value in ("6.6.6.6", "7.7.7.7", "evil.example", "gopher"):
            assert value not in head, (value, head)
        assert seen.header_values("x-forwarded-for") == ["127.0.0.1"]
        assert seen.header_values("x-forwarded-proto") == ["http"]
        assert seen.header_values("x-forwarded-host") == ["gateway"]
        assert seen.header_values("forwarded") == []
        assert seen.header_values("x-real-ip") == []


async def test_every_client_sent_x_forwarded_header_is_dropped(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(**key_body(key_mode)))["key"]
        r = await post(gw, [("authorization", f"Bearer {key}"), *OTHER_X_FORWARDED])
        assert r.status_code == 200, r.text
        seen = recorder.records[0]
        leftover = [(k, v) for k, v in seen.headers if k.lower() in dict(OTHER_X_FORWARDED)]
        assert leftover == [], seen.head_text()
        x_forwarded = {k.lower() for k, _ in seen.headers if k.lower().startswith("x-forwarded-")}
        assert x_forwarded <= {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}


async def test_managed_mode_without_an_upstream_key_forwards_no_credential(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    settings = make_settings(sqlite_url, recorder.url, upstream_api_key=None)
    async with running_gateway(settings, clock) as gw:
        key = (await gw.create_key(max_budget=10.0))["key"]
        r = await post(
            gw, [("api-key", key), ("x-litellm-api-key", SMUGGLED), ("connection", "api-key")]
        )
        assert r.status_code == 200, r.text
        seen = recorder.records[0]
        assert seen.credentials() == [], seen.head_text()
        assert key not in seen.head_text() and SMUGGLED not in seen.head_text()


async def test_passthrough_forwards_only_a_registered_key(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    """Passthrough: an unregistered upstream key is a 401, in every client header, with or
    without a registered one riding along elsewhere."""
    settings = make_settings(sqlite_url, recorder.url, key_mode="passthrough")
    async with running_gateway(settings, clock) as gw:
        await gw.create_key(**key_body("passthrough"))
        for h in CLIENT_KEY_HEADERS:
            r = await post(gw, [(h, carrying(h, SMUGGLED))])
            assert_openai_error(r, 401)
            for other in OTHER_CREDENTIAL_HEADERS:
                r = await post(gw, [(h, carrying(h, SMUGGLED)), (other, PASSTHROUGH_KEY)])
                assert_openai_error(r, 401)
        assert recorder.records == []


async def test_underscore_variants_of_the_headers_the_gateway_sets_or_drops(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    async with running_gateway(make_settings(sqlite_url, recorder.url), clock) as gw:
        key = (await gw.create_key(max_budget=10.0))["key"]
        sent = [
            ("x_forwarded_for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
            ("x_request_id", "req_forged"),
            ("x_litellm_model", "bg-test"),
        ]
        r = await post(gw, [("authorization", f"Bearer {key}"), *sent])
        assert r.status_code == 200, r.text
        head = recorder.records[0].head_text()
        for name, value in sent:
            assert value not in head, (name, head)

"""Hostile request bodies on the five metered endpoints, with a valid key: every one gets a 4xx
in the OpenAI error format (never a 5xx), and input rejected before admission leaves the
ledger exactly as it was (no reservation, spend and reserved unchanged, no ledger entry) and
never reaches the upstream. A hypothesis test then throws arbitrary JSON values and bytes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.clock import ManualClock
from app.config import Settings
from tests.conftest import Gateway, make_settings, running_gateway
from tests.hostile.helpers import (
    METERED,
    VALID,
    assert_client_error,
    assert_reconciled,
    dumps,
    is_openai_error,
    ledger_state,
)
from tests.keys.helpers import bearer, key_object
from tests.servers import ServerThread

OUTPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/embeddings": (),
    "/v1/messages": ("max_tokens",),
}
DEEP = 10_000  # nesting levels

# Not JSON, or not JSON any parser must accept, on every endpoint: 400 invalid_json.
MALFORMED: list[bytes] = [
    b"",
    b"   ",
    b"{",
    b"}",
    b"{}{}",
    b'{"model": "bg-test",}',
    b"{'model': 'bg-test'}",
    b"nul",
    b"\x00",
    b'{"model": "bg-test"} trailing',
    b'\xef\xbb\xbf{"model": "bg-test"}',  # UTF-8 byte order mark
    b'{"model": "bg-test", "max_tokens": NaN}',
    b'{"model": "bg-test", "max_tokens": Infinity}',
    b'{"model": "bg-test", "max_tokens": 1e400}',  # infinity as a double
    # invalid UTF-8: a lone continuation byte, a truncated sequence, an encoded surrogate, an
    # overlong encoding
    b'{"model": "bg-\xff"}',
    b'{"model": "bg-test", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
    b'{"model": "bg-test", "input": "\xed\xa0\x80"}',
    b'{"model": "bg-test", "input": "\xc0\xaf"}',
    # escaped lone surrogates (not representable in UTF-8)
    b'{"model": "\\ud800"}',
    b'{"model": "bg-test", "input": "x\\udc00"}',
    # 10,000 levels of nesting, inside a field and at the top
    b'{"model": "bg-test", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"model": "bg-test", "metadata": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"}",
    b"[" * DEEP + b"]" * DEEP,
    # JSON, but not an object
    b"[]",
    b'[{"model": "bg-test", "max_tokens": 5}]',
    b'"bg-test"',
    b"42",
    b"null",
    b"true",
]

BAD_MODELS: list[Any] = [1, 1.5, ["bg-test"], None, "", {}, True, "m" * 256]
BAD_STREAM: list[Any] = ["yes", "true", 1, 0, [], {"on": True}]
BAD_TOKENS: list[Any] = [
    "10",
    -1,
    1.5,
    10.0,
    10**30,
    -(10**30),
    2**63,
    2**64,
    10_000_001,
    True,
    [],
    {},
    [5],
]
BAD_STREAM_OPTIONS: list[Any] = [[], ["include_usage"], "include_usage", 1, True]


def typed_cases(path: str) -> list[tuple[dict[str, Any], str]]:
    """(body, the field the 400 must name) for every known field's wrong types."""
    valid = VALID[path]
    cases: list[tuple[dict[str, Any], str]] = []
    for model in BAD_MODELS:
        cases.append(({**valid, "model": model}, "model"))
    cases.append(({k: v for k, v in valid.items() if k != "model"}, "model"))
    for stream in BAD_STREAM:
        cases.append(({**valid, "stream": stream}, "stream"))
    for field in OUTPUT_FIELDS[path]:
        for value in [*BAD_TOKENS, 0]:  # 0 bounds nothing (many upstreams read it as unset)
            cases.append(({**valid, field: value}, field))
    # Output multipliers bound the cost (SPEC 10): one the gateway cannot use is refused.
    multipliers = {"/v1/chat/completions": ("n",), "/v1/completions": ("n", "best_of")}
    for field in multipliers.get(path, ()):
        for value in [*BAD_TOKENS, 0]:
            cases.append(({**valid, field: value}, field))
    if path in ("/v1/chat/completions", "/v1/completions"):
        for options in BAD_STREAM_OPTIONS:
            cases.append(({**valid, "stream": True, "stream_options": options}, "stream_options"))
    return cases


async def post(gw: Gateway, path: str, key: str, raw: bytes, **headers: str) -> Any:
    return await gw.client.post(
        path, content=raw, headers={**bearer(key), "content-type": "application/json", **headers}
    )


async def test_valid_bodies_are_admitted(gateway: Gateway, mock_upstream: ServerThread) -> None:
    """The control: the bodies every case below breaks are fine as they are."""
    key = await gateway.create_key(max_budget=10.0)
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    for path in METERED:
        r = await post(gateway, path, key["key"], dumps(VALID[path]))
        assert r.status_code == 200, (path, r.text)
    after = await ledger_state(gateway, key["id"], mock_upstream.url)
    assert after.upstream == before.upstream + len(METERED)
    assert after.entries == before.entries + len(METERED)
    assert after.reserved == 0 and after.spend > 0
    await assert_reconciled(gateway)


async def test_malformed_bodies_are_400_and_change_nothing(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=10.0, budget_duration="1d")
    assert (await gateway.chat(key["key"], max_tokens=7)).status_code == 200  # some spend
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    for path in METERED:
        for raw in MALFORMED:
            r = await post(gateway, path, key["key"], raw)
            err = assert_client_error(r, 400)
            assert err["type"] == "invalid_request_error", (path, raw[:60], err)
            assert err["code"] == "invalid_json", (path, raw[:60], err)
            # An authenticated error still carries the request id and the budget headers.
            assert r.headers["x-request-id"].startswith("req_")
            assert r.headers["x-budget-spend"] == "0.007"
    assert await ledger_state(gateway, key["id"], mock_upstream.url) == before
    await assert_reconciled(gateway)


async def test_wrong_types_for_known_fields_are_422_naming_the_field(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=10.0)
    assert (await gateway.chat(key["key"], max_tokens=3)).status_code == 200
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    checked = 0
    for path in METERED:
        for body, field in typed_cases(path):
            r = await post(gateway, path, key["key"], dumps(body))
            err = assert_client_error(r, 422)  # SPEC 7: 422 invalid field, named
            assert err["param"] == field, (path, body, err)
            assert field in err["message"], (path, body, err)
            checked += 1
    assert checked >= 150
    assert await ledger_state(gateway, key["id"], mock_upstream.url) == before
    await assert_reconciled(gateway)


async def test_nul_in_model_or_path_is_a_client_error_not_a_ledger_outage(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    """A NUL character (valid JSON, `\\u0000`, or `%00` in the path) is the client's error: it
    must not reach the ledger (PostgreSQL text cannot hold it) and be reported as the ledger
    being down (503), whatever BUDGETGATE_UNPRICED_MODEL says."""
    for unpriced in ("reject", "free"):
        settings = make_settings(database_url, mock_upstream.url, unpriced_model=unpriced)
        async with running_gateway(settings, clock) as gw:
            key = await gw.create_key(max_budget=10.0)
            before = await ledger_state(gw, key["id"], mock_upstream.url)
            for path in METERED:
                for model in ("bg-test\u0000", "\u0000", "x\u0000y"):
                    r = await post(gw, path, key["key"], dumps({**VALID[path], "model": model}))
                    err = assert_client_error(r, 422)
                    assert err["param"] == "model", err
            for path in ("/v1/files%00x", "/v1/chat/completions%00", "/v1/%00/models"):
                r = await gw.client.post(path, content=b"{}", headers=bearer(key["key"]))
                assert_client_error(r, 400, 404)
            assert await ledger_state(gw, key["id"], mock_upstream.url) == before
            await assert_reconciled(gw)


async def test_fields_the_gateway_does_not_own_are_forwarded_and_settled(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """`messages: "a string"` and such are the upstream's to judge (SPEC 3: the body is
    forwarded intact); whatever it answers, the request ends in one settled ledger entry."""
    key = await gateway.create_key(max_budget=10.0)
    odd: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"messages": "hello"}),
        ("/v1/chat/completions", {"messages": 1}),
        ("/v1/chat/completions", {"messages": None}),
        ("/v1/chat/completions", {"messages": [{"role": 7, "content": {"x": [1, 2]}}]}),
        ("/v1/chat/completions", {"stream": False, "stream_options": []}),  # not streamed
        ("/v1/completions", {"prompt": {"a": 1}}),
        ("/v1/responses", {"input": 12345}),
        ("/v1/embeddings", {"input": {"nested": [None, True]}}),
        ("/v1/embeddings", {"max_tokens": "not an embeddings field"}),
        ("/v1/messages", {"messages": "hello", "system": 5}),
        ("/v1/chat/completions", {"max_tokens": None}),  # absent: the default bound is set
        ("/v1/chat/completions", {"temperature": "hot", "tools": "x"}),
    ]
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    for path, change in odd:
        r = await post(gateway, path, key["key"], dumps({**VALID[path], **change}))
        assert r.status_code < 500, (path, change, r.status_code, r.text)
        if r.status_code >= 400:
            assert is_openai_error(r), (path, change, r.text)
        got = await key_object(gateway, key["id"])
        assert got["reserved"] == 0, (path, change, got)
    after = await ledger_state(gateway, key["id"], mock_upstream.url)
    assert after.upstream == before.upstream + len(odd)
    assert after.entries == before.entries + len(odd)
    assert after.reservations == 0
    await assert_reconciled(gateway)


# -- 413: a body one byte over BUDGETGATE_MAX_BODY_BYTES -------------------------------------


def padded(path: str, size: int) -> bytes:
    """A valid request body of exactly `size` bytes (JSON whitespace as padding)."""
    raw = dumps(VALID[path])
    assert len(raw) <= size
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


async def test_body_one_byte_over_the_limit_is_413_at_the_limit_admitted(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    limit = 4096
    settings = make_settings(database_url, mock_upstream.url, max_body_bytes=limit)
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(max_budget=10.0)
        for path in METERED:
            before = await ledger_state(gw, key["id"], mock_upstream.url)
            over = padded(path, limit + 1)
            assert len(over) == limit + 1 and orjson.loads(over) == VALID[path]
            r = await post(gw, path, key["key"], over)
            err = assert_client_error(r, 413)
            assert err["code"] == "request_too_large" and str(limit) in err["message"]

            # The same without a content-length (chunked upload): the limit holds while reading.
            async def chunks(raw: bytes = over) -> Any:
                for i in range(0, len(raw), 1000):
                    yield raw[i : i + 1000]

            r = await gw.client.post(
                path, content=chunks(), headers={**bearer(key["key"]), "x-test": "chunked"}
            )
            assert_client_error(r, 413)
            assert await ledger_state(gw, key["id"], mock_upstream.url) == before

            # Exactly at the limit: admitted, forwarded, settled.
            r = await post(gw, path, key["key"], padded(path, limit))
            assert r.status_code == 200, (path, r.text)
            after = await ledger_state(gw, key["id"], mock_upstream.url)
            assert (after.upstream, after.entries) == (before.upstream + 1, before.entries + 1)
            assert after.reserved == 0
        await assert_reconciled(gw)


async def test_body_over_the_default_10_mb_limit_is_413(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    limit = Settings.model_fields["max_body_bytes"].default
    assert limit == gateway.settings.max_body_bytes == 10 * 1024 * 1024
    key = await gateway.create_key(max_budget=10.0)
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    over = padded("/v1/chat/completions", limit + 1)
    r = await post(gateway, "/v1/chat/completions", key["key"], over)
    assert_client_error(r, 413)

    async def chunks() -> Any:
        for i in range(0, len(over), 1 << 20):
            yield over[i : i + (1 << 20)]

    r = await gateway.client.post("/v1/embeddings", content=chunks(), headers=bearer(key["key"]))
    assert_client_error(r, 413)
    assert await ledger_state(gateway, key["id"], mock_upstream.url) == before


# -- hypothesis: arbitrary JSON values and bytes ---------------------------------------------

KNOWN_FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Objects that look like requests: known fields with arbitrary values (the model often a
# priced one, so that some get past parsing and are admitted).
REQUEST_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["bg-test", "bg-priced"]) | JSON_VALUES,
        **{f: JSON_VALUES for f in KNOWN_FIELDS[1:]},
        "max_tokens": st.integers(min_value=-5, max_value=50) | JSON_VALUES,
    },
)
BODIES = st.binary(max_size=300) | JSON_VALUES.map(dumps) | REQUEST_LIKE.map(dumps)


async def run_hypothesis(
    strategy: st.SearchStrategy[Any],
    check: Callable[[Any], Awaitable[None]],
    *,
    max_examples: int,
) -> None:
    """Runs `check` for each example on this test's event loop, with hypothesis driving from a
    worker thread (its engine is synchronous). Derandomized, so CI sees the same examples."""
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def sync(value: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(value), loop).result(timeout=60)

    await asyncio.to_thread(sync)


async def test_arbitrary_bodies_never_5xx_and_never_leak_a_reservation(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1000.0)
    statuses: dict[int, int] = {}

    async def check(example: tuple[str, bytes]) -> None:
        path, raw = example
        r = await post(gateway, path, key["key"], raw)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, raw, r.status_code, r.text)
        if r.status_code >= 400:
            assert is_openai_error(r), (path, raw, r.status_code, r.text)
        got = await key_object(gateway, key["id"])
        assert got["reserved"] == 0, (path, raw, got)

    await run_hypothesis(st.tuples(st.sampled_from(METERED), BODIES), check, max_examples=150)
    assert statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0, statuses
    after = await ledger_state(gateway, key["id"], mock_upstream.url)
    assert after.reservations == 0
    await assert_reconciled(gateway)


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
async def test_arbitrary_bodies_with_a_bad_key_are_401_and_forward_nothing(
    gateway: Gateway, mock_upstream: ServerThread, header: str
) -> None:
    """A bad key's 401 comes before any body error, whatever the body."""
    key = await gateway.create_key(max_budget=10.0)
    before = await ledger_state(gateway, key["id"], mock_upstream.url)
    value = "Bearer sk-bg-nope" if header == "authorization" else "sk-bg-nope"

    async def check(example: tuple[str, bytes]) -> None:
        path, raw = example
        r = await gateway.client.post(path, content=raw, headers={header: value})
        assert_client_error(r, 401)

    await run_hypothesis(st.tuples(st.sampled_from(METERED), BODIES), check, max_examples=40)
    assert await ledger_state(gateway, key["id"], mock_upstream.url) == before

"""SPEC 7 error list: every error a client can get, its status and the OpenAI error body
({"error": {"message", "type", "code", "param"}}, never a stack trace), on proxy and admin
routes, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.clock import ManualClock
from app.models.reservation import Reservation
from tests.conftest import START, Gateway, make_settings, running_gateway
from tests.keys.helpers import (  # database_url: SQLite from a migrated template copy
    admin_with_headers,
    assert_openai_error,
    bearer,
    database_url,
    key_object,
    ledger,
    pg_reused,
    upstream_requests,
)
from tests.servers import ServerThread, free_port

CHAT = {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

MakeGateway = Callable[..., AbstractAsyncContextManager[Gateway]]
_ = (database_url, pg_reused)


@pytest.fixture
def custom_gateway(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> MakeGateway:
    """`async with custom_gateway(**settings_overrides) as gw:` on this test's database."""

    def make(**overrides: object) -> AbstractAsyncContextManager[Gateway]:
        upstream = str(overrides.pop("upstream_url", mock_upstream.url))
        return running_gateway(make_settings(database_url, upstream, **overrides), clock)

    return make


# -- 400 malformed JSON --------------------------------------------------------------------


async def test_malformed_json_on_proxy_route_is_400(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1.0)
    before = await upstream_requests(mock_upstream.url)
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/embeddings", "/v1/messages"):
        for raw in (b'{"model": "bg-test", "messages": [', b"", b"\xff\xfe"):
            r = await gateway.client.post(
                path,
                content=raw,
                headers={**bearer(key["key"]), "content-type": "application/json"},
            )
            assert_openai_error(
                r, 400, type="invalid_request_error", code="invalid_json", in_message=("JSON",)
            )
        # A JSON value that is not an object is malformed for these endpoints too.
        r = await gateway.client.post(path, content=b"[1, 2]", headers=bearer(key["key"]))
        assert_openai_error(r, 400, type="invalid_request_error", code="invalid_json")
    assert await upstream_requests(mock_upstream.url) == before
    assert (await key_object(gateway, key["id"]))["reserved"] == 0


async def test_malformed_json_on_admin_route_is_400(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="kept", max_budget=1.0)
    for content_type in ("application/json", "application/json; charset=utf-8"):
        for method, path in [("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{key['id']}")]:
            for raw in (b'{"alias": "a",', b"{'alias': 'a'}", b"nope"):
                r = await admin_with_headers(
                    gateway, method, path, {"content-type": content_type}, content=raw
                )
                assert_openai_error(
                    r,
                    400,
                    type="invalid_request_error",
                    code="invalid_json",
                    in_message=("JSON",),
                )
    assert (await key_object(gateway, key["id"]))["alias"] == "kept"
    r = await gateway.admin("GET", "/admin/keys")
    assert len(r.json()["data"]) == 1


# -- 401 keys ------------------------------------------------------------------------------


async def test_missing_key_is_401(gateway: Gateway, mock_upstream: ServerThread) -> None:
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.client.post("/v1/chat/completions", json=CHAT)
    assert_openai_error(
        r, 401, type="authentication_error", code="invalid_api_key", in_message=("API key",)
    )
    # A non-bearer Authorization scheme, or an empty bearer, is no key either.
    for auth in ("Basic dXNlcjpwYXNz", "Bearer ", "Bearer"):
        r = await gateway.client.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": auth}
        )
        assert_openai_error(r, 401, type="authentication_error", code="invalid_api_key")
    r = await gateway.client.get("/v1/models")
    assert_openai_error(r, 401, code="invalid_api_key")
    r = await gateway.client.get("/v1/budget")
    assert_openai_error(r, 401, code="invalid_api_key")
    assert await upstream_requests(mock_upstream.url) == before


async def test_unknown_key_is_401(gateway: Gateway, mock_upstream: ServerThread) -> None:
    await gateway.create_key(max_budget=1.0)
    before = await upstream_requests(mock_upstream.url)
    unknown = "sk-bg-" + "A" * 43
    for headers in (bearer(unknown), {"api-key": unknown}, {"x-api-key": unknown}):
        r = await gateway.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        err = assert_openai_error(r, 401, type="authentication_error", code="invalid_api_key")
        assert unknown not in err["message"]
    r = await gateway.client.post("/v1/other", content=b"x", headers=bearer(unknown))
    assert_openai_error(r, 401, code="invalid_api_key")
    r = await gateway.client.get("/v1/models", headers=bearer(unknown))
    assert_openai_error(r, 401, code="invalid_api_key")
    assert await upstream_requests(mock_upstream.url) == before
    assert await ledger(gateway) == []


async def test_revoked_key_is_401(gateway: Gateway, mock_upstream: ServerThread) -> None:
    key = await gateway.create_key(alias="soon-revoked", max_budget=1.0)
    assert (await gateway.chat(key["key"])).status_code == 200
    r = await gateway.admin("DELETE", f"/admin/keys/{key['id']}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "revoked"
    assert "key" not in r.json()
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.chat(key["key"])
    err = assert_openai_error(
        r, 401, type="authentication_error", code="invalid_api_key", in_message=("revoked",)
    )
    assert key["key"] not in err["message"]
    r = await gateway.client.get("/v1/models", headers=bearer(key["key"]))
    assert_openai_error(r, 401, code="invalid_api_key", in_message=("revoked",))
    r = await gateway.client.get("/v1/budget", headers=bearer(key["key"]))
    assert_openai_error(r, 401, code="invalid_api_key")
    assert await upstream_requests(mock_upstream.url) == before
    # History kept: the key and its one ledger entry are still there; nothing stays reserved
    # (the key was known to the process, so its body was read: the admission refused it).
    got = await key_object(gateway, key["id"])
    assert (got["status"], got["reserved"], got["spend"]) == ("revoked", 0, 0.01)
    assert len(await ledger(gateway, key["id"])) == 1
    assert await open_reservations(gateway) == 0


async def test_expired_key_is_401(gateway: Gateway, mock_upstream: ServerThread) -> None:
    expires = START + timedelta(hours=1)
    key = await gateway.create_key(max_budget=1.0, expires_at=expires.isoformat())
    assert (await gateway.chat(key["key"])).status_code == 200

    gateway.clock.advance(timedelta(hours=1))  # expires_at itself is already expired
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.chat(key["key"])
    err = assert_openai_error(
        r, 401, type="authentication_error", code="invalid_api_key", in_message=("expired",)
    )
    assert key["key"] not in err["message"]
    shown = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert key["status"] == "active" and shown["status"] == "expired"
    listed = (await gateway.admin("GET", "/admin/keys")).json()["data"]
    assert [k["status"] for k in listed if k["id"] == key["id"]] == ["expired"]
    r = await gateway.client.get("/v1/models", headers=bearer(key["key"]))
    assert_openai_error(r, 401, code="invalid_api_key", in_message=("expired",))
    assert await upstream_requests(mock_upstream.url) == before
    assert (await key_object(gateway, key["id"]))["reserved"] == 0
    assert await open_reservations(gateway) == 0

    # A key created with expires_at already in the past (per the injected clock).
    past = await gateway.create_key(
        max_budget=1.0, expires_at=(gateway.clock.now() - timedelta(days=1)).isoformat()
    )
    assert_openai_error(await gateway.chat(past["key"]), 401, in_message=("expired",))
    # Moving expires_at into the future (PATCH) makes the key usable again.
    later = (gateway.clock.now() + timedelta(days=1)).isoformat()
    r = await gateway.admin("PATCH", f"/admin/keys/{past['id']}", json={"expires_at": later})
    assert r.status_code == 200, r.text
    assert past["status"] == "expired" and r.json()["status"] == "active"
    assert (await gateway.chat(past["key"])).status_code == 200


# -- 403 model not allowed -----------------------------------------------------------------


async def test_model_not_in_allow_list_is_403(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(alias="limited", max_budget=1.0, models=["bg-test"])
    assert (await gateway.chat(key["key"], model="bg-test")).status_code == 200
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.chat(key["key"], model="bg-priced")
    err = assert_openai_error(
        r,
        403,
        type="permission_error",
        code="model_not_allowed",
        param="model",
        in_message=("bg-priced",),
    )
    assert key["key"] not in err["message"]
    assert await upstream_requests(mock_upstream.url) == before
    got = await key_object(gateway, key["id"])
    assert got["reserved"] == 0
    assert got["spend"] == 0.01
    # An empty allow-list allows every model.
    r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"models": []})
    assert r.status_code == 200 and r.json()["models"] == []
    assert (await gateway.chat(key["key"], model="bg-priced")).status_code == 200


# -- budget headers on authenticated errors (SPEC 3) ------------------------------------------


async def test_authenticated_errors_carry_request_id_and_budget_headers(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1.0, budget_duration="1d", models=["bg-test"])
    assert (await gateway.chat(key["key"], max_tokens=10)).status_code == 200
    before = await upstream_requests(mock_upstream.url)
    errors = [
        (403, await gateway.chat(key["key"], model="bg-priced")),
        (
            400,
            await gateway.client.post(
                "/v1/chat/completions", content=b"{", headers=bearer(key["key"])
            ),
        ),
        (422, await gateway.chat(key["key"], max_tokens=-1)),
    ]
    r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"models": []})
    assert r.status_code == 200
    errors.append((400, await gateway.chat(key["key"], model="not-priced-anywhere")))
    ids = set()
    for status, r in errors:
        assert_openai_error(r, status)
        assert r.headers["x-request-id"].startswith("req_"), r.headers
        ids.add(r.headers["x-request-id"])
        assert r.headers["x-budget-spend"] == "0.01"
        assert r.headers["x-budget-max-budget"] == "1.0"
        assert r.headers["x-budget-remaining"] == "0.99"
        assert r.headers["x-budget-reset-at"] == "2026-01-16T00:00:00Z"
    assert len(ids) == len(errors)
    # Unauthenticated errors have no budget to report.
    r = await gateway.chat("sk-bg-unknown-key-000000000000000000000000")
    assert_openai_error(r, 401)
    assert not any(h.startswith("x-budget-") for h in r.headers)
    assert await upstream_requests(mock_upstream.url) == before
    assert (await key_object(gateway, key["id"]))["reserved"] == 0


# -- 404 unknown id ------------------------------------------------------------------------


async def test_unknown_key_id_is_404(gateway: Gateway) -> None:
    await gateway.create_key(max_budget=1.0)
    missing = "key_00000000000000000000000000000000"
    calls = [
        ("GET", f"/admin/keys/{missing}", None),
        ("PATCH", f"/admin/keys/{missing}", {"max_budget": 2.0}),
        ("PATCH", f"/admin/keys/{missing}", {}),
        ("DELETE", f"/admin/keys/{missing}", None),
        ("POST", f"/admin/keys/{missing}/reset", None),
        ("GET", f"/admin/keys/{missing}/periods", None),
    ]
    for method, path, body in calls:
        kwargs = {"json": body} if body is not None else {}
        r = await gateway.admin(method, path, **kwargs)
        assert_openai_error(r, 404, type="not_found_error", code="not_found", in_message=(missing,))


async def test_unknown_admin_path_is_404_and_never_forwarded(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1.0)
    before = await upstream_requests(mock_upstream.url)
    calls = [
        ("GET", "/admin/nope"),
        ("POST", "/admin/keys/abc/unknown"),
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/admin/v1/chat/completions"),
        ("POST", "/admin/v1/chat/completions"),
        ("DELETE", "/admin/ledger/x"),
        ("PUT", "/admin/keys"),
    ]
    for method, path in calls:
        admin = {"authorization": f"Bearer {gateway.settings.admin_key.get_secret_value()}"}  # type: ignore[union-attr]
        r = await gateway.client.request(method, path, headers=admin, content=b"{}")
        assert r.status_code in (404, 405), (method, path, r.status_code, r.text)
        if method != "PUT":
            assert r.status_code == 404, (method, path, r.text)
        assert_openai_error(r, r.status_code)
        # Without the admin key nothing under /admin is told apart (nor its body read).
        for headers in (bearer(key["key"]), {}):
            r = await gateway.client.request(method, path, headers=headers, content=b"{}")
            assert_openai_error(r, 401, code="invalid_admin_key")
    assert await upstream_requests(mock_upstream.url) == before
    assert await ledger(gateway) == []


# -- 413 body too large --------------------------------------------------------------------


async def test_body_larger_than_limit_is_413_and_not_forwarded(
    custom_gateway: MakeGateway, mock_upstream: ServerThread
) -> None:
    async with custom_gateway(
        max_body_bytes=1000, extra_routes="POST /v1/other/path, PUT /v1/files/{id}"
    ) as gw:
        key = await gw.create_key(max_budget=1.0)
        before = await upstream_requests(mock_upstream.url)
        big = {"model": "bg-test", "messages": [{"role": "user", "content": "x" * 2000}]}
        r = await gw.client.post("/v1/chat/completions", json=big, headers=bearer(key["key"]))
        assert_openai_error(
            r, 413, type="invalid_request_error", code="request_too_large", in_message=("1000",)
        )
        assert r.headers["x-request-id"] and r.headers["x-budget-max-budget"] == "1.0"

        # Without a content-length (chunked upload), the limit holds while reading.
        async def chunks():  # noqa: ANN202
            for _ in range(5):
                yield b"y" * 400

        r = await gw.client.post("/v1/other/path", content=chunks(), headers=bearer(key["key"]))
        assert_openai_error(r, 413, code="request_too_large")
        # An extra route with a declared large body.
        r = await gw.client.put("/v1/files/x", content=b"z" * 1001, headers=bearer(key["key"]))
        assert_openai_error(r, 413, code="request_too_large")
        assert await upstream_requests(mock_upstream.url) == before
        assert (await key_object(gw, key["id"]))["reserved"] == 0

        # At the limit is fine.
        r = await gw.client.post("/v1/other/path", content=b"y" * 1000, headers=bearer(key["key"]))
        assert r.status_code == 200, r.text
        assert await upstream_requests(mock_upstream.url) == before + 1


# -- 422 invalid fields --------------------------------------------------------------------

DURATION_HINT = ("s, m, h, d, w, mo or y", "1mo")


BAD_DURATIONS = ["5x", "0d", "1 month", "", "-1d", "1.5h", "d", "1D", "01d", " 1d", "1d ", 7]


async def test_bad_budget_duration_is_422_naming_the_accepted_forms(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=1, budget_duration="1d")
    for duration in BAD_DURATIONS:
        for body in (
            {"max_budget": 1, "budget_duration": duration},
            {"max_budget": 1, "budgets": [{"max_budget": 1, "budget_duration": duration}]},
        ):
            r = await gateway.admin("POST", "/admin/keys", json=body)
            err = assert_openai_error(
                r,
                422,
                type="invalid_request_error",
                code="invalid_value",
                in_message=("budget_duration", *DURATION_HINT),
            )
            assert err["param"].endswith("budget_duration"), err
        r = await gateway.admin(
            "PATCH", f"/admin/keys/{key['id']}", json={"budget_duration": duration}
        )
        assert_openai_error(
            r, 422, param="budget_duration", in_message=("budget_duration", *DURATION_HINT)
        )
    assert (await key_object(gateway, key["id"]))["budget_duration"] == "1d"
    # Only the one valid key exists: the invalid create wrote nothing.
    assert len((await gateway.admin("GET", "/admin/keys")).json()["data"]) == 1


INVALID_FIELDS = [
    ({"max_budget": -1}, "max_budget"),
    ({"max_budget": -0.000001}, "max_budget"),
    ({"soft_budget": -5}, "soft_budget"),
    ({"max_budget": "ten"}, "max_budget"),
    ({"max_budget": 1, "budget_timezone": "Mars/Olympus_Mons"}, "budget_timezone"),
    ({"max_budget": 1, "budget_timezone": "Not A Zone"}, "budget_timezone"),
    ({"max_budget": 1, "budget_anchor": "next tuesday"}, "budget_anchor"),
    ({"max_budget": 1, "expires_at": "soon"}, "expires_at"),
    ({"max_budget": 1, "models": "bg-test"}, "models"),
    ({"max_budget": 1, "metadata": [1]}, "metadata"),
    ({"max_budget": 1, "unknown_field": 1}, "unknown_field"),
    ({"max_budget": 1, "budget": 5}, "budget"),
    ({"max_budget": 1, "soft_budget": 2}, "soft_budget"),
    ({"max_budget": "NaN"}, "max_budget"),
    ({"max_budget": 1e300}, "max_budget"),
    ({"alias": "a" * 256}, "alias"),
]


async def test_invalid_field_is_422_naming_the_field(gateway: Gateway) -> None:
    for body, field in INVALID_FIELDS:
        r = await gateway.admin("POST", "/admin/keys", json=body)
        assert_openai_error(
            r,
            422,
            type="invalid_request_error",
            code="invalid_value",
            param=field,
            in_message=(field,),
        )
    # An extra window with soft_budget > max_budget is refused as a whole too.
    r = await gateway.admin(
        "POST",
        "/admin/keys",
        json={"max_budget": 5, "budgets": [{"max_budget": 1, "soft_budget": 2}]},
    )
    assert_openai_error(r, 422, in_message=("soft_budget",))
    # Nothing was created by any of them.
    assert (await gateway.admin("GET", "/admin/keys")).json()["data"] == []


async def test_invalid_field_on_patch_is_422_and_changes_nothing(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="p", max_budget=1, soft_budget=0.5, budget_duration="1mo")
    cases = [
        ({"max_budget": -1}, "max_budget"),
        ({"budget_timezone": "Nowhere/Land"}, "budget_timezone"),
        ({"bogus": True}, "bogus"),
        ({"soft_budget": 2}, "soft_budget"),  # above the existing max_budget
        ({"max_budget": 0.5, "soft_budget": 0.75}, "soft_budget"),
    ]
    for body, field in cases:
        r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json=body)
        assert_openai_error(r, 422, param=field, in_message=(field,))
    got = await key_object(gateway, key["id"])
    assert (got["max_budget"], got["soft_budget"], got["budget_timezone"]) == (1.0, 0.5, "UTC")
    # Lowering max_budget under the soft budget is no mistake: max_budget 0 freezes the key.
    r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"max_budget": 0})
    assert r.status_code == 200 and (r.json()["max_budget"], r.json()["soft_budget"]) == (0, 0.5)


async def test_invalid_query_parameter_is_422(gateway: Gateway) -> None:
    for path, field in [
        ("/admin/keys?limit=0", "limit"),
        ("/admin/ledger?limit=abc", "limit"),
        ("/admin/ledger?since=yesterday", "since"),
        ("/admin/ledger?cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("/admin/usage?group_by=team", "group_by"),
    ]:
        r = await gateway.admin("GET", path)
        assert_openai_error(r, 422, param=field, in_message=(field,))


# -- 429 over budget -----------------------------------------------------------------------


async def test_budget_exceeded_is_429(gateway: Gateway, mock_upstream: ServerThread) -> None:
    key = await gateway.create_key(alias="team-a", max_budget=0.01, budget_duration="1mo")
    assert (await gateway.chat(key["key"], max_tokens=10)).status_code == 200  # spends $0.01
    gateway.clock.advance(1)
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.chat(key["key"], max_tokens=1)
    err = assert_openai_error(
        r,
        429,
        type="budget_exceeded",
        code="budget_exceeded",
        in_message=("team-a", "max_budget", "$0.0100", "2026-02-01T00:00:00Z"),
    )
    assert err["param"] is None
    assert key["key"] not in err["message"]
    assert key["key_prefix"] in err["message"]
    assert r.headers["x-budget-max-budget"] == "0.01"
    assert r.headers["x-budget-remaining"] == "0.0"
    assert r.headers["x-budget-reset-at"] == "2026-02-01T00:00:00Z"
    expected_retry = int((START.replace(month=2, day=1, hour=0) - START).total_seconds()) - 1
    assert int(r.headers["retry-after"]) == expected_retry
    assert r.headers["x-request-id"]
    assert await upstream_requests(mock_upstream.url) == before
    entries = await ledger(gateway, key["id"])
    assert [e["outcome"] for e in entries] == ["rejected", "ok"]
    assert entries[0]["cost"] == 0


async def test_zero_budget_lifetime_key_is_429_without_retry_after(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=0)
    r = await gateway.chat(key["key"])
    assert_openai_error(r, 429, type="budget_exceeded", in_message=("does not reset",))
    assert "retry-after" not in r.headers
    assert "x-budget-reset-at" not in r.headers


# -- 502 / 504 upstream --------------------------------------------------------------------


async def test_upstream_unreachable_is_502_and_releases_the_reservation(
    custom_gateway: MakeGateway,
) -> None:
    async with custom_gateway(
        upstream_url=f"http://127.0.0.1:{free_port()}", extra_routes="POST /v1/files"
    ) as gw:
        key = await gw.create_key(max_budget=1.0, budget_duration="1d")
        r = await gw.chat(key["key"], max_tokens=10)
        err = assert_openai_error(r, 502, type="upstream_error", code="upstream_unreachable")
        assert "127.0.0.1" not in err["message"]
        assert r.headers["x-request-id"]
        got = await key_object(gw, key["id"])
        assert got["reserved"] == 0
        assert got["spend"] == 0
        entries = await ledger(gw, key["id"])
        assert len(entries) == 1
        assert entries[0]["outcome"] == "upstream_error"
        assert entries[0]["cost"] == 0
        assert entries[0]["request_id"] == r.headers["x-request-id"]
        # Same on an extra route and on GET /v1/models.
        r = await gw.client.post("/v1/files", content=b"abc", headers=bearer(key["key"]))
        assert_openai_error(r, 502, code="upstream_unreachable")
        r = await gw.client.get("/v1/models", headers=bearer(key["key"]))
        assert_openai_error(r, 502, code="upstream_unreachable")
        assert (await key_object(gw, key["id"]))["reserved"] == 0
        assert [e["outcome"] for e in await ledger(gw, key["id"])] == ["upstream_error"] * 2


async def test_upstream_timeout_is_504_and_releases_the_reservation(
    custom_gateway: MakeGateway,
) -> None:
    async with custom_gateway(upstream_timeout_seconds=0.5) as gw:
        key = await gw.create_key(max_budget=1.0)
        r = await gw.client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={**bearer(key["key"]), "x-mock-hang": "1"},
        )
        assert_openai_error(r, 504, type="upstream_error", code="upstream_timeout")
        assert r.headers["x-request-id"]
        got = await key_object(gw, key["id"])
        assert (got["reserved"], got["spend"]) == (0, 0)
        entries = await ledger(gw, key["id"])
        assert [(e["outcome"], e["cost"]) for e in entries] == [("timeout", 0)]
        assert entries[0]["request_id"] == r.headers["x-request-id"]


# -- 503 ledger database unreachable -------------------------------------------------------


async def test_ledger_unreachable_is_503_and_nothing_forwarded(
    mock_upstream: ServerThread, clock: ManualClock, tmp_path
) -> None:  # noqa: ANN001
    urls = [
        f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'ledger.db'}",
        f"postgresql+asyncpg://bg:bg@127.0.0.1:{free_port()}/bg",
    ]
    for url in urls:
        async with running_gateway(make_settings(url, mock_upstream.url), clock) as gw:
            before = await upstream_requests(mock_upstream.url)
            r = await gw.chat("sk-bg-" + "b" * 43)
            assert_openai_error(r, 503, type="service_unavailable", code="ledger_unavailable")
            r = await gw.client.get("/v1/models", headers=bearer("sk-bg-" + "b" * 43))
            assert_openai_error(r, 503, code="ledger_unavailable")
            assert await upstream_requests(mock_upstream.url) == before
            r = await gw.admin("GET", "/admin/keys")
            assert_openai_error(r, 503, type="service_unavailable", code="ledger_unavailable")
            r = await gw.admin("POST", "/admin/keys", json={"max_budget": 1})
            assert_openai_error(r, 503, code="ledger_unavailable")
            r = await gw.client.get("/readyz")
            assert_openai_error(r, 503, code="ledger_unavailable")
            assert (await gw.client.get("/healthz")).status_code == 200


# -- admin authentication ------------------------------------------------------------------


@pytest.mark.parametrize("admin_key", [None, ""], ids=["unset", "empty"])
async def test_admin_api_without_admin_key_configured_is_503(
    custom_gateway: MakeGateway, admin_key: str | None
) -> None:
    """Empty is unset: it was a key that an empty credential matched (an open admin API)."""
    async with custom_gateway(admin_key=admin_key) as gw:
        for method, path in [
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("GET", "/admin/ledger"),
            ("GET", "/admin/usage"),
            ("GET", "/admin/keys/key_x/periods"),
        ]:
            for headers in ({}, {"authorization": "Bearer anything"}, {"authorization": "Bearer "}):
                r = await gw.client.request(method, path, headers=headers, json={})
                assert_openai_error(
                    r,
                    503,
                    type="service_unavailable",
                    code="admin_disabled",
                    in_message=("BUDGETGATE_ADMIN_KEY",),
                )
        # Proxy and health routes still work.
        assert (await gw.client.get("/healthz")).status_code == 200


async def test_admin_api_with_wrong_or_missing_admin_key_is_401(gateway: Gateway) -> None:
    client_key = await gateway.create_key(max_budget=1.0)
    admin = gateway.settings.admin_key.get_secret_value()  # type: ignore[union-attr]
    wrong = [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Bearer {admin}x"},
        {"authorization": f"Bearer {admin[:-1]}"},
        {"authorization": f"Basic {admin}"},
        {"authorization": admin},
        bearer(client_key["key"]),
        {"authorization": "Bearer ünïcödé".encode()},
    ]
    for headers in wrong:
        for method, path in [
            ("GET", "/admin/keys"),
            ("POST", "/admin/keys"),
            ("GET", f"/admin/keys/{client_key['id']}"),
            ("DELETE", f"/admin/keys/{client_key['id']}"),
            ("GET", "/admin/ledger"),
        ]:
            r = await gateway.client.request(method, path, headers=headers, json={"max_budget": 1})
            err = assert_openai_error(r, 401, type="authentication_error")
            assert admin not in err["message"]
    assert (await key_object(gateway, client_key["id"]))["status"] == "active"
    assert len((await gateway.admin("GET", "/admin/keys")).json()["data"]) == 1


# -- unpriced models -----------------------------------------------------------------------


async def test_unpriced_model_rejected_by_default(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(max_budget=1.0)
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.chat(key["key"], model="no-such-model-xyz")
    assert_openai_error(
        r,
        400,
        type="invalid_request_error",
        code="model_not_priced",
        param="model",
        in_message=("no-such-model-xyz", "BUDGETGATE_UNPRICED_MODEL"),
    )
    assert await upstream_requests(mock_upstream.url) == before
    assert (await key_object(gateway, key["id"]))["reserved"] == 0


async def test_unpriced_model_free_is_forwarded_and_charged_zero(
    custom_gateway: MakeGateway, mock_upstream: ServerThread
) -> None:
    async with custom_gateway(unpriced_model="free") as gw:
        key = await gw.create_key(max_budget=1.0)
        before = await upstream_requests(mock_upstream.url)
        r = await gw.chat(key["key"], model="no-such-model-xyz", max_tokens=7)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 7
        assert await upstream_requests(mock_upstream.url) == before + 1
        got = await key_object(gw, key["id"])
        assert (got["spend"], got["reserved"]) == (0, 0)
        entries = await ledger(gw, key["id"])
        assert len(entries) == 1
        e = entries[0]
        assert (e["model"], e["cost"], e["cost_source"], e["outcome"]) == (
            "no-such-model-xyz",
            0,
            "free",
            "ok",
        )
        # A priced model on the same gateway is still charged.
        assert (await gw.chat(key["key"], model="bg-test", max_tokens=10)).status_code == 200
        assert (await key_object(gw, key["id"]))["spend"] == 0.01


async def open_reservations(gateway: Gateway) -> int:
    async with gateway.state.engine.connect() as conn:
        held = await conn.execute(select(func.count()).select_from(Reservation.__table__))
        count = int(held.scalar_one())
        await conn.rollback()
    return count


# -- bodies of the gateway's own routes ------------------------------------------------------


async def test_admin_bodies_obey_the_same_size_and_time_limits(
    custom_gateway: MakeGateway,
) -> None:
    """The admin API's bodies are read by the same reader as proxied ones: a chunked body over
    the limit is a 413 in the OpenAI format, a body that trickles is a 408, nothing written."""
    async with custom_gateway(max_body_bytes=1000, body_timeout_seconds=0.3) as gw:
        admin = {"authorization": f"Bearer {gw.settings.admin_key.get_secret_value()}"}  # type: ignore[union-attr]

        async def chunked():  # noqa: ANN202
            yield b'{"alias": "'
            for _ in range(5):
                yield b"y" * 400
            yield b'"}'

        r = await gw.client.post("/admin/keys", content=chunked(), headers=admin)
        assert_openai_error(r, 413, code="request_too_large")

        async def trickle():  # noqa: ANN202
            yield b'{"max_budget": '
            await asyncio.sleep(1)
            yield b"1}"

        r = await gw.client.post("/admin/keys", content=trickle(), headers=admin)
        assert_openai_error(r, 408, code="request_timeout", in_message=("0.3 seconds",))
        assert (await gw.admin("GET", "/admin/keys")).json()["data"] == []
        r = await gw.client.post("/admin/keys", json={"max_budget": 1}, headers=admin)
        assert r.status_code == 201, r.text


async def test_a_model_the_key_may_not_use_is_403_before_its_price_is_looked_at(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    """Authorization before judgement: an unpriced model outside the key's allow-list is a 403,
    not the 400 that would tell the client which models the gateway can price."""
    key = await gateway.create_key(max_budget=1.0, models=["bg-test"])
    before = await upstream_requests(mock_upstream.url)
    for model in ("unpriced-model", "bg-priced"):
        r = await gateway.chat(key["key"], model=model)
        assert_openai_error(r, 403, code="model_not_allowed", in_message=(model,))
    open_key = await gateway.create_key(max_budget=1.0)
    r = await gateway.chat(open_key["key"], model="unpriced-model")
    assert_openai_error(r, 400, code="model_not_priced")
    assert await upstream_requests(mock_upstream.url) == before

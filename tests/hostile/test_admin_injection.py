"""SQL-looking, unicode, oversized and unstorable values on the admin API: stored and returned
verbatim (parameterized queries), or refused with a 422 naming the field; filters match
exactly, nothing more; the schema survives and the ledger reconciles afterwards. On SQLite and
PostgreSQL (whose text cannot hold NUL, and whose JSON has no NaN)."""

from __future__ import annotations

from typing import Any

from tests.conftest import Gateway
from tests.hostile.helpers import (
    TABLES,
    assert_client_error,
    assert_reconciled,
    count_rows,
    table_names,
)
from tests.keys.helpers import ADMIN_KEY, key_object

SQLISH = [
    "x'); DROP TABLE api_keys; --",
    "' OR 1=1 --",
    '" OR ""="',
    "'; DELETE FROM ledger_entries; SELECT '",
    "1; UPDATE budget_periods SET spend = 0",
    "%",
    "_",
    "\\",
    "' UNION SELECT key_hash FROM api_keys --",
    "$1",
    ":alias",
    "?",
]
UNICODE = [
    "团队-α 🚀",
    "Ωmega\u200b",  # zero-width space
    "\u202eevil",  # right-to-left override
    "é" * 255,  # 255 characters, 510 bytes
    "🚀" * 255,  # 255 characters, 1020 bytes
    "a" * 255,
    "tab\there\nnewline",
]
A_JSON = "application/json"


async def test_sql_looking_and_unicode_values_round_trip_verbatim(gateway: Gateway) -> None:
    created: dict[str, dict[str, Any]] = {}
    for alias in SQLISH + UNICODE:
        body = {
            "alias": alias,
            "max_budget": 1,
            "models": [alias, "bg-test"],
            "metadata": {alias: alias, "nested": {"list": [alias, 1, None, True, 1.5]}},
        }
        key = await gateway.create_key(**body)
        created[alias] = key
        for got in (key, await key_object(gateway, key["id"])):
            assert got["alias"] == alias
            assert got["models"] == [alias, "bg-test"]
            assert got["metadata"] == body["metadata"]
    # PATCH them too (the other write path).
    for alias, key in created.items():
        r = await gateway.admin(
            "PATCH", f"/admin/keys/{key['id']}", json={"alias": alias[::-1], "metadata": {}}
        )
        assert r.status_code == 200, r.text
        assert r.json()["alias"] == alias[::-1]
        r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"alias": alias})
        assert r.status_code == 200 and r.json()["alias"] == alias

    # Every alias filter matches exactly its key: no wildcard, no injected condition.
    for alias, key in created.items():
        r = await gateway.admin("GET", "/admin/keys", params={"alias": alias})
        assert r.status_code == 200, r.text
        assert [k["id"] for k in r.json()["data"]] == [key["id"]], alias
    for probe in ("' OR 1=1 --x", "' OR '1'='1", "%%", "x' --", "1 OR 1=1", "*", ""):
        r = await gateway.admin("GET", "/admin/keys", params={"alias": probe})
        assert r.status_code == 200, r.text
        assert r.json()["data"] == [], probe
    # Ids and ledger filters too.
    for probe in ("' OR '1'='1", "key_x' OR 1=1 --", "%", "*"):
        r = await gateway.admin("GET", f"/admin/keys/{probe}")
        assert_client_error(r, 404)
        r = await gateway.admin("GET", "/admin/ledger", params={"key_id": probe})
        assert r.status_code == 200 and r.json()["data"] == [], r.text
    r = await gateway.admin("GET", "/admin/usage", params={"group_by": "key' OR 1=1 --"})
    assert_client_error(r, 422)

    assert await table_names(gateway) >= TABLES
    assert await count_rows(gateway, "api_keys") == len(created)
    r = await gateway.admin("GET", "/admin/keys", params={"limit": 500})
    assert len(r.json()["data"]) == len(created)
    await assert_reconciled(gateway)


async def test_sql_looking_keys_still_authenticate_and_spend(gateway: Gateway) -> None:
    """A key whose alias, models and metadata are SQL-looking still works on the proxy, and
    its spend is recorded against it alone."""
    alias = "x'); DROP TABLE api_keys; --"
    key = await gateway.create_key(alias=alias, max_budget=1, models=["bg-test", alias])
    other = await gateway.create_key(alias="' OR 1=1 --", max_budget=1)
    assert (await gateway.chat(key["key"], max_tokens=10)).status_code == 200
    assert (await key_object(gateway, key["id"]))["spend"] == 0.01
    assert (await key_object(gateway, other["id"]))["spend"] == 0
    r = await gateway.chat(key["key"], model=alias)  # an allowed, unpriced model name
    assert_client_error(r, 400)
    assert await table_names(gateway) >= TABLES
    await assert_reconciled(gateway)


async def test_oversized_aliases_are_422_and_write_nothing(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="kept", max_budget=1)
    for alias in ("a" * 256, "é" * 256, "🚀" * 256, "x'); DROP TABLE api_keys; --" * 20):
        r = await gateway.admin("POST", "/admin/keys", json={"alias": alias, "max_budget": 1})
        err = assert_client_error(r, 422)
        assert err["param"] == "alias" and "alias" in err["message"], err
        assert alias not in err["message"]
        r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json={"alias": alias})
        assert_client_error(r, 422)
    assert (await key_object(gateway, key["id"]))["alias"] == "kept"
    assert await count_rows(gateway, "api_keys") == 1


async def test_unstorable_values_are_422_on_every_database(gateway: Gateway) -> None:
    """NUL characters (PostgreSQL text cannot hold them), lone surrogates (not UTF-8), NaN and
    Infinity (not JSON): refused with a 422 naming the field, on SQLite and PostgreSQL alike,
    never a 500 -- and nothing half-written that would break later reads."""
    key = await gateway.create_key(alias="kept", max_budget=1, metadata={"team": "a"})
    bodies: list[tuple[bytes, str]] = [
        (b'{"alias": "a\\u0000b"}', "alias"),
        (b'{"alias": "\\u0000"}', "alias"),
        (b'{"alias": "\\ud800"}', "alias"),
        (b'{"models": ["bg-test", "x\\u0000"]}', "models"),
        (b'{"models": ["\\udfff"]}', "models"),
        (b'{"metadata": {"k": "\\udc00"}}', "metadata"),
        (b'{"metadata": {"k": ["ok", {"deep": "\\ud83d"}]}}', "metadata"),
        (b'{"metadata": {"k": {"\\udc00": 1}}}', "metadata"),
        (b'{"metadata": {"k": "a\\u0000b"}}', "metadata"),
        (b'{"metadata": {"k": NaN}}', "metadata"),
        (b'{"metadata": {"k": [1, Infinity]}}', "metadata"),
        (b'{"metadata": {"k": -Infinity}}', "metadata"),
        (b'{"metadata": {"k": 1e400}}', "metadata"),
        (b'{"max_budget": NaN}', "max_budget"),
        (b'{"max_budget": Infinity}', "max_budget"),
        (b'{"budget_duration": "1d\\u0000"}', "budget_duration"),
        (b'{"budget_duration": "\\udc00"}', "budget_duration"),
        (b'{"budget_timezone": "UTC\\u0000"}', "budget_timezone"),
        (b'{"budget_timezone": "\\udc00"}', "budget_timezone"),
        (b'{"\\udc00": 1}', "\udc00"),  # an unknown field whose name is not UTF-8
        (b'{"x\\u0000": 1}', "x\x00"),
    ]
    headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": A_JSON}
    for raw, field in bodies:
        for method, path in (("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{key['id']}")):
            r = await gateway.client.request(method, path, content=raw, headers=headers)
            err = assert_client_error(r, 422)
            if field.isprintable() and field.isascii():
                assert err["param"] == field, (raw, err)
    # Nothing was written, and every read still works.
    assert await count_rows(gateway, "api_keys") == 1
    got = await key_object(gateway, key["id"])
    assert (got["alias"], got["metadata"], got["models"]) == ("kept", {"team": "a"}, [])
    r = await gateway.admin("GET", "/admin/keys")
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    await assert_reconciled(gateway)


async def test_nul_in_admin_paths_and_queries_is_422_not_500(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="kept", max_budget=1)
    calls: list[tuple[str, str, dict[str, str]]] = [
        ("GET", "/admin/keys", {"alias": "kept\x00"}),
        ("GET", "/admin/keys", {"alias": "\x00"}),
        ("GET", "/admin/keys", {"cursor": "\x00"}),
        ("GET", "/admin/ledger", {"key_id": f"{key['id']}\x00"}),
        ("GET", "/admin/ledger", {"cursor": "a\x00"}),
        ("GET", "/admin/usage", {"since": "2026-01-01\x00"}),
        ("GET", "/admin/keys/key_%00", {}),
        ("PATCH", f"/admin/keys/{key['id']}%00", {}),
        ("DELETE", "/admin/keys/%00", {}),
        ("POST", "/admin/keys/%00/reset", {}),
        ("GET", "/admin/keys/%00/periods", {}),
    ]
    for method, path, params in calls:
        kwargs: dict[str, Any] = {"params": params}
        if method == "PATCH":
            kwargs["json"] = {"alias": "changed"}
        r = await gateway.admin(method, path, **kwargs)
        assert_client_error(r, 422, 404)
    got = await key_object(gateway, key["id"])
    assert (got["alias"], got["status"]) == ("kept", "active")
    await assert_reconciled(gateway)

"""Every admin route in the OpenAPI schema refuses a missing or wrong admin key -- including a
key that differs only in its last character and prefixes of the real key -- with a 401 in the
OpenAI error format, and changes nothing; and the comparison is hmac.compare_digest."""

from __future__ import annotations

import inspect
from typing import Any

from fastapi.routing import APIRoute

from app.keys import router as admin_router_module
from tests.conftest import ADMIN_KEY, Gateway
from tests.hostile.helpers import assert_client_error, assert_reconciled, count_rows
from tests.keys.helpers import key_object

Headers = list[tuple[bytes, bytes]]


def _last_char_changed(secret: str) -> str:
    return secret[:-1] + ("0" if secret[-1] != "0" else "1")


def wrong_credentials(client_key: str) -> list[Headers]:
    admin = ADMIN_KEY
    bearer_values = [
        _last_char_changed(admin),
        admin[:-1],  # prefixes of the real key
        admin[: len(admin) // 2],
        admin[:1],
        admin + "x",  # the real key extended
        admin + admin,
        admin.upper(),
        admin + "\x00",
        "\x00" + admin,
        admin + "é",
        "wrong",
        "A" * 60_000,  # long, under the 64 KB head cap (above it: 431, test_body_before_auth)
        client_key,  # a valid client key is no admin key
    ]
    headers: list[Headers] = [[]]
    headers += [[(b"authorization", f"Bearer {v}".encode())] for v in bearer_values]
    headers += [
        [(b"authorization", v.encode())]
        for v in (
            "Bearer",
            "Bearer ",
            "Bearer  ",
            admin,  # no scheme
            f"Basic {admin}",
            f"Token {admin}",
            f"Bearer{admin}",
        )
    ]
    headers += [
        # Duplicated: ambiguous, whichever comes first.
        [(b"authorization", f"Bearer {admin}".encode()), (b"authorization", b"Bearer wrong")],
        [(b"authorization", b"Bearer wrong"), (b"authorization", f"Bearer {admin}".encode())],
        # A wrong Authorization is not rescued by the real key in another header.
        [(b"authorization", b"Bearer wrong"), (b"x-api-key", admin.encode())],
        [(b"authorization", b"Basic xyz"), (b"api-key", admin.encode())],
        [(b"x-api-key", _last_char_changed(admin).encode())],
        [(b"api-key", admin[:-1].encode())],
    ]
    return headers


UNKNOWN_OWNER = "owner_unknown"
# The owners' collections (SPEC 11) and a body that creates one of each.
OWNER_BODIES: dict[str, dict[str, Any]] = {
    "/admin/teams": {"alias": "intruder"},
    "/admin/users": {"alias": "intruder"},
    "/admin/tags": {"name": "intruder"},
    "/admin/end-users": {"user": "intruder"},
}


async def create_owners(gw: Gateway, key_id: str) -> dict[str, str]:
    """One owner of each kind (collection path -> id), for the control pass to act on."""
    ids = {}
    for collection, body in OWNER_BODIES.items():
        owned = {field: "owned" for field in body} | (
            {"key_id": key_id} if collection == "/admin/end-users" else {}
        )
        r = await gw.admin("POST", collection, json=owned)
        assert r.status_code == 201, r.text
        ids[collection] = r.json()["id"]
    return ids


async def admin_operations(
    gw: Gateway, key_id: str, owners: dict[str, str] | None = None
) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path with {key_id} and {owner_id} filled in, request kwargs) for every /admin
    operation of the served OpenAPI schema; deletions last (a deleted owner is not reset)."""
    r = await gw.client.get("/openapi.json")
    assert r.status_code == 200
    ops = []
    for path, methods in r.json()["paths"].items():
        if not path.startswith("/admin"):
            continue
        collection = path.split("/{")[0]
        for method in methods:
            kwargs: dict[str, Any] = {}
            if method == "post" and path == "/admin/keys":
                kwargs["json"] = {"alias": "intruder", "max_budget": 1}
            elif method == "post" and path in OWNER_BODIES:
                extra = {"key_id": key_id} if path == "/admin/end-users" else {}
                kwargs["json"] = OWNER_BODIES[path] | extra
            elif method == "patch" and collection in ("/admin/tags", "/admin/end-users"):
                kwargs["json"] = {"max_budget": 0}
            elif method == "patch" and collection in OWNER_BODIES:
                kwargs["json"] = {"alias": "renamed", "max_budget": 0}
            elif method == "patch":
                kwargs["json"] = {"alias": "intruder", "max_budget": 0}
            owner_id = (owners or {}).get(collection, UNKNOWN_OWNER)
            filled = path.replace("{key_id}", key_id).replace("{owner_id}", owner_id)
            ops.append((method.upper(), filled, kwargs))
    return sorted(ops, key=lambda op: op[0] == "DELETE")


def served_routes(routes: list[Any]) -> list[Any]:
    """Every route the app serves, through included routers (FastAPI keeps those as
    `_IncludedRouter` entries holding the original router)."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            out += served_routes(inner.routes)
        elif hasattr(r, "path") and hasattr(r, "methods"):
            out.append(r)
    return out


def test_every_admin_route_depends_on_require_admin_and_compares_in_constant_time() -> None:
    """Read the code: the check is one router-wide dependency, compared by hmac.compare_digest
    (never ==), and no admin route escapes it."""
    assert "check_admin_key(" in inspect.getsource(admin_router_module.require_admin)
    source = inspect.getsource(admin_router_module.check_admin_key)
    assert "hmac.compare_digest(" in source
    assert "==" not in source and "!=" not in source
    router = admin_router_module.router
    assert any(d.dependency is admin_router_module.require_admin for d in router.dependencies)
    routes = [r for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) >= 9
    for route in routes:
        assert route.path.startswith("/admin"), route.path
        deps = {d.call for d in route.dependant.dependencies}
        assert admin_router_module.require_admin in deps, route.path


async def test_every_admin_route_refuses_a_wrong_or_missing_admin_key(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="kept", max_budget=1, budget_duration="1d")
    assert (await gateway.chat(key["key"], max_tokens=5)).status_code == 200
    ops = await admin_operations(gateway, key["id"])
    # The schema lists every admin route (nothing is hidden from it, so from this test).
    api_routes = {
        (m, r.path)
        for r in served_routes(gateway.app.api.routes)
        if r.path.startswith("/admin")
        for m in r.methods
    }
    assert {
        (m, p.replace(key["id"], "{key_id}").replace(UNKNOWN_OWNER, "{owner_id}"))
        for m, p, _ in ops
    } == api_routes
    assert len(ops) >= 9

    before = await key_object(gateway, key["id"])
    refused = 0
    for headers in wrong_credentials(key["key"]):
        for method, path, kwargs in ops:
            r = await gateway.client.request(method, path, headers=headers, **kwargs)
            err = assert_client_error(r, 401)
            assert err["type"] == "authentication_error", (method, path, headers, err)
            assert err["code"] == "invalid_admin_key", (method, path, err)
            assert ADMIN_KEY not in r.text and ADMIN_KEY[:-1] not in r.text
            refused += 1
    assert refused == len(ops) * len(wrong_credentials(key["key"]))

    # Nothing changed: no key created, none revoked, reset or edited.
    after = await key_object(gateway, key["id"])
    assert after == before
    assert await count_rows(gateway, "api_keys") == 1
    assert await count_rows(gateway, "budget_periods") == 1
    await assert_reconciled(gateway)

    # The control: the real key passes on every one of them (so the 401s above are the key's).
    owners = await create_owners(gateway, key["id"])
    for method, path, kwargs in await admin_operations(gateway, key["id"], owners):
        r = await gateway.admin(method, path, **kwargs)
        assert r.status_code < 300, (method, path, r.status_code, r.text)

"""Dashboard sign-in, sessions and CSRF, in-process: who gets in, what the cookie carries, what
a form without its token gets, and what the read-only viewer may not do."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import httpx
import pytest

from app.clock import ManualClock
from tests.conftest import ADMIN_KEY, START, make_settings, running_gateway
from tests.servers import ServerThread
from tests.ui.helpers import csrf_of, sign_in

VIEWER_KEY = "viewer-key-for-the-finance-lead-77"


@pytest.fixture
async def ui(sqlite_url: str, mock_upstream: ServerThread) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(sqlite_url, mock_upstream.url, viewer_key=VIEWER_KEY)
    async with running_gateway(settings, ManualClock(START)) as gw:
        yield gw.client


async def test_pages_need_a_session(ui: httpx.AsyncClient) -> None:
    for path in ("/ui/", "/ui/keys", "/ui/usage", "/ui/usage.csv", "/ui/ledger", "/ui/keys/new"):
        r = await ui.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/ui/login?next=")


async def test_sign_in_with_the_admin_key_sets_a_safe_cookie(ui: httpx.AsyncClient) -> None:
    r = await sign_in(ui, ADMIN_KEY)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    value = cookie.split(";")[0].split("=", 1)[1]
    decoded = base64.urlsafe_b64decode(value.split(".")[0] + "==").decode()
    assert ADMIN_KEY not in value and ADMIN_KEY not in decoded
    page = await ui.get("/ui/")
    assert page.status_code == 200 and "Overview" in page.text
    assert ADMIN_KEY not in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'self'" in page.headers["content-security-policy"]


async def test_the_cookie_is_secure_behind_https(ui: httpx.AsyncClient) -> None:
    page = await ui.get("/ui/login", headers={"x-forwarded-proto": "https"})
    assert "Secure" in page.headers["set-cookie"]


async def test_a_wrong_key_is_refused(ui: httpx.AsyncClient) -> None:
    r = await sign_in(ui, ADMIN_KEY + "x")
    assert r.status_code == 401
    assert "neither the admin key nor the viewer key" in r.text
    assert (await ui.get("/ui/")).status_code == 303


async def test_a_form_without_its_csrf_token_is_refused(ui: httpx.AsyncClient) -> None:
    page = await ui.get("/ui/login")
    r = await ui.post("/ui/login", data={"key": ADMIN_KEY})
    assert r.status_code == 403 and "security token" in r.text
    r = await ui.post("/ui/login", data={"key": ADMIN_KEY, "csrf": csrf_of(page.text) + "x"})
    assert r.status_code == 403
    await sign_in(ui, ADMIN_KEY)
    new_key = await ui.get("/ui/keys/new")
    r = await ui.post("/ui/keys/new", data={"alias": "no-token", "max_budget": "1"})
    assert r.status_code == 403
    # The sign-in form's token (an earlier session's) is no good either.
    r = await ui.post(
        "/ui/keys/new", data={"alias": "old-token", "csrf": csrf_of(page.text), "max_budget": "1"}
    )
    assert r.status_code == 403
    r = await ui.post(
        "/ui/keys/new", data={"alias": "ok", "csrf": csrf_of(new_key.text), "max_budget": "1"}
    )
    assert r.status_code == 201 and "sk-bg-" in r.text


async def test_a_tampered_cookie_is_no_session(ui: httpx.AsyncClient) -> None:
    await sign_in(ui, VIEWER_KEY)
    value = ui.cookies["budgetgate_session"]
    body, mac = value.split(".")
    forged = (
        base64.urlsafe_b64encode(base64.urlsafe_b64decode(body + "==").replace(b"viewer", b"admin"))
        .decode()
        .rstrip("=")
    )
    ui.cookies.set("budgetgate_session", f"{forged}.{mac}", path="/ui")
    r = await ui.get("/ui/keys/new")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")


async def test_the_viewer_reads_but_cannot_write(ui: httpx.AsyncClient) -> None:
    r = await sign_in(ui, VIEWER_KEY)
    assert r.status_code == 303
    overview = await ui.get("/ui/")
    assert overview.status_code == 200 and "Viewer (read-only)" in overview.text
    assert VIEWER_KEY not in overview.text
    keys = await ui.get("/ui/keys")
    assert keys.status_code == 200 and "New key" not in keys.text
    assert (await ui.get("/ui/keys/new")).status_code == 403
    r = await ui.post("/ui/keys/new", data={"alias": "x", "csrf": csrf_of(keys.text)})
    assert r.status_code == 403


async def test_sign_out_ends_the_session(ui: httpx.AsyncClient) -> None:
    await sign_in(ui, ADMIN_KEY)
    page = await ui.get("/ui/")
    r = await ui.post("/ui/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert "budgetgate_session" not in ui.cookies
    assert (await ui.get("/ui/")).status_code == 303


async def test_next_never_leaves_the_dashboard(ui: httpx.AsyncClient) -> None:
    page = await ui.get("/ui/login")
    r = await ui.post(
        "/ui/login",
        data={"csrf": csrf_of(page.text), "key": ADMIN_KEY, "next": "https://evil.example/"},
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui/"


async def test_without_any_key_nobody_signs_in(
    sqlite_url: str, mock_upstream: ServerThread
) -> None:
    settings = make_settings(sqlite_url, mock_upstream.url, admin_key=None)
    async with running_gateway(settings, ManualClock(START)) as gw:
        r = await gw.client.get("/ui/login")
        assert r.status_code == 503 and "BUDGETGATE_ADMIN_KEY" in r.text


def test_the_viewer_key_cannot_be_the_admin_key() -> None:
    with pytest.raises(ValueError, match="must differ from BUDGETGATE_ADMIN_KEY"):
        make_settings("sqlite+aiosqlite:///x.db", "http://127.0.0.1:9", viewer_key=ADMIN_KEY)

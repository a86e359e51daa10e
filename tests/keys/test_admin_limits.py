"""Admin bodies are bounded by BUDGETGATE_MAX_BODY_BYTES too, with the OpenAI error body."""

from app.clock import ManualClock
from tests.conftest import ADMIN_KEY, make_settings, running_gateway
from tests.servers import ServerThread


async def test_admin_body_larger_than_the_limit_is_413(
    sqlite_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(sqlite_url, mock_upstream.url, max_body_bytes=100)
    async with running_gateway(settings, clock) as gw:
        auth = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        big = b'{"alias": "' + b"x" * 200 + b'"}'
        r = await gw.client.post("/admin/keys", content=big, headers=auth)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"
        listed = await gw.client.get("/admin/keys", headers=auth)
        assert listed.json()["data"] == []  # nothing was created
        small = await gw.client.post("/admin/keys", content=b'{"alias": "ok"}', headers=auth)
        assert small.status_code == 201


async def test_a_garbage_key_list_cursor_is_422(
    sqlite_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    async with running_gateway(make_settings(sqlite_url, mock_upstream.url), clock) as gw:
        for cursor in ("%%%", "bm9wZQ", "x"):
            r = await gw.admin("GET", "/admin/keys", params={"cursor": cursor})
            assert r.status_code == 422, (cursor, r.text)
            assert r.json()["error"]["param"] == "cursor"

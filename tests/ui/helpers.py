"""Signing in to the dashboard with an httpx client (the in-process tests)."""

from __future__ import annotations

import re

import httpx

CSRF = re.compile(r'name="csrf" value="([^"]*)"')


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    page = await client.get("/ui/login")
    assert page.status_code == 200
    return await client.post(
        "/ui/login", data={"csrf": csrf_of(page.text), "key": key, "next": "/ui/"}
    )

"""The dashboard in a real browser (chromium, through Playwright) against a running gateway:
sign in, the overview's figures against the admin API to the cent, a key created in the page
and spent through the proxy, its bar and the 429 count moving, a reset, the CSV export against
the API, a team's page and the owners list, sign-out; a wrong key and a missing CSRF token
refused; every page at laptop and phone width in artifacts/ui-screenshots; no request from any
page leaving the gateway's origin."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.conftest import ADMIN_KEY
from tests.ui.browser import NetworkLog, dollars, shoot, to_the_cent, watch
from tests.ui.conftest import VIEWER_KEY, LiveGateway

pytestmark = pytest.mark.process


def sign_in(page: Any, url: str, key: str) -> None:
    page.goto(url + "/ui/")
    assert "/ui/login" in page.url
    page.get_by_label("Admin or viewer key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(url + "/ui/")


def session_role(cookie: str) -> str:
    payload = cookie.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))[1])


def figure(page: Any, figure_id: str) -> str:
    return page.locator(f"#{figure_id} dd").inner_text()


def today_start() -> datetime:
    return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def rejected_today(gw: LiveGateway) -> int:
    entries = gw.admin.get("/admin/ledger", since=today_start().isoformat(), limit=1000)["data"]
    return sum(1 for e in entries if e["outcome"] == "rejected")


def test_the_dashboard_end_to_end(browser: Any, live_gateway: LiveGateway) -> None:
    gw = live_gateway
    context = browser.new_context(viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = context.new_page()
    log = NetworkLog(gw.url)
    watch(page, log)

    # -- sign-in: a wrong key, then the admin key ---------------------------------------------
    page.goto(gw.url + "/ui/")
    assert page.url.startswith(gw.url + "/ui/login")
    shoot(page, "login")
    page.get_by_label("Admin or viewer key").fill(ADMIN_KEY + "-wrong")
    with page.expect_response(
        lambda r: r.url.endswith("/ui/login") and r.request.method == "POST"
    ) as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    assert "neither the admin key nor the viewer key" in page.locator("#login-error").inner_text()
    page.get_by_label("Admin or viewer key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(gw.url + "/ui/")
    assert ADMIN_KEY not in page.content()
    assert all(ADMIN_KEY not in c["value"] for c in context.cookies())
    (session_cookie,) = [c for c in context.cookies() if c["name"] == "budgetgate_session"]
    assert session_cookie["httpOnly"] and session_cookie["sameSite"] == "Strict"

    # -- the overview against the admin API, to the cent ------------------------------------------
    first_day = (today_start() - timedelta(days=29)).isoformat()
    by_day = gw.admin.get("/admin/usage", group_by="day", since=first_day)
    assert to_the_cent(figure(page, "fig-30d-spend"), by_day["total_spend"])
    assert dollars(figure(page, "fig-30d-spend")) > 50  # the seeded history is in it
    today = gw.admin.get("/admin/usage", group_by="model", since=today_start().isoformat())
    assert to_the_cent(figure(page, "fig-today-spend"), today["total_spend"])
    by_model = gw.admin.get("/admin/usage", group_by="model", since=first_day)["data"]
    rows = page.locator("#by-model tbody tr")
    assert rows.count() == len(by_model) >= 4
    shown = {
        rows.nth(i).get_attribute("data-model"): rows.nth(i).locator(".spend").inner_text()
        for i in range(rows.count())
    }
    for m in by_model:
        assert to_the_cent(shown[m["model"] or ""], m["spend"]), m
    keys = gw.admin.get("/admin/keys")["data"]
    assert to_the_cent(
        figure(page, "fig-period-spend"), sum(Decimal(str(k["spend"])) for k in keys)
    )
    assert int(figure(page, "fig-429")) == rejected_today(gw) >= 1
    week = gw.admin.get(
        "/admin/usage", group_by="key", since=(today_start() - timedelta(days=6)).isoformat()
    )["data"]
    top = page.locator("#top-spenders tbody tr")
    assert top.count() == len(week) == 3
    biggest = max(week, key=lambda r: r["spend"])
    assert top.first.get_attribute("data-owner") == biggest["key"]
    assert to_the_cent(top.first.locator(".spend").inner_text(), biggest["spend"])
    # The nearest to its limit first: finance-bot ($0.10) is exhausted.
    first = page.locator("#nearest tbody tr").first
    assert first.get_attribute("data-owner") == gw.keys[1]["id"]
    shoot(page, "overview")

    # -- create a key in the page -------------------------------------------------------------------
    page.get_by_role("link", name="Keys", exact=True).click()
    page.get_by_role("link", name="New key").click()
    page.get_by_label("Alias").fill("browser-made")
    page.get_by_label("Budget (US dollars)").fill("0.05")
    page.get_by_label("Resets every").fill("1mo")
    shoot(page, "key-new")
    page.get_by_role("button", name="Create key").click()
    plaintext = page.get_by_label("The new key").input_value()
    assert plaintext.startswith("sk-bg-")
    shoot(page, "key-created")
    page.get_by_role("link", name="Go to the key's page").click()
    key_id = page.url.rsplit("/", 1)[1]
    api_key = gw.admin.get(f"/admin/keys/{key_id}")
    assert api_key["alias"] == "browser-made" and api_key["max_budget"] == 0.05
    bar_before = page.locator("#budgets svg.bar").first.get_attribute("aria-label")
    assert "(0%)" in bar_before
    page.goto(gw.url + "/ui/")
    refused_before = int(figure(page, "fig-429"))

    # -- spend it through the proxy until it is refused ------------------------------------------
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=plaintext, max_retries=0)
    answered = 0
    with pytest.raises(openai.RateLimitError):
        for _ in range(20):
            client.chat.completions.create(
                model="bg-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
            answered += 1
    client.close()
    assert answered == 5  # $0.01 each against $0.05
    page.reload()
    assert int(figure(page, "fig-429")) == refused_before + 1 == rejected_today(gw)
    page.goto(gw.url + f"/ui/owners/key/{key_id}")
    api_key = gw.admin.get(f"/admin/keys/{key_id}")
    row = page.locator("#budgets tbody tr").first
    assert to_the_cent(row.locator(".spend").inner_text(), api_key["spend"])
    assert dollars(row.locator(".spend").inner_text()) == Decimal("0.05")
    bar_after = row.locator("svg.bar").get_attribute("aria-label")
    assert "(100%)" in bar_after and bar_after != bar_before
    assert page.locator("table.entries tbody tr").count() == 6  # five answered, one refused
    assert page.locator("table.entries .outcome").first.inner_text() == "rejected"
    shoot(page, "owner")

    # -- reset it, confirming ----------------------------------------------------------------
    page.get_by_role("link", name="Reset period").click()
    shoot(page, "confirm-reset")
    page.get_by_role("button", name="Reset the period").click()
    assert "The period was reset." in page.locator(".notice").inner_text()
    api_key = gw.admin.get(f"/admin/keys/{key_id}")
    assert api_key["spend"] == 0
    assert dollars(page.locator("#budgets tbody tr .spend").first.inner_text()) == 0
    assert "manual" in page.locator("#periods").inner_text()

    # -- edit it, then keys search and filters -------------------------------------------------
    page.get_by_role("link", name="Edit").click()
    page.get_by_label("Budget (US dollars)").fill("2.50")
    page.get_by_role("button", name="Save").click()
    assert "Saved." in page.locator(".notice").inner_text()
    assert gw.admin.get(f"/admin/keys/{key_id}")["max_budget"] == 2.5
    page.goto(gw.url + "/ui/keys")
    page.get_by_label("Search alias, id or prefix").fill("browser")
    page.get_by_role("button", name="Filter").click()
    assert page.locator("#keys tbody tr").count() == 1
    page.goto(gw.url + "/ui/keys?status=exhausted")
    exhausted = [
        page.locator("#keys tbody tr").nth(i).get_attribute("data-key")
        for i in range(page.locator("#keys tbody tr").count())
    ]
    assert exhausted == [gw.keys[1]["id"]]
    page.goto(gw.url + "/ui/keys")
    shoot(page, "keys")

    # -- usage explorer and its CSV against the API -------------------------------------------
    page.get_by_role("link", name="Usage", exact=True).click()
    since = page.get_by_label("From (UTC day)").input_value()
    until = page.get_by_label("To (UTC day, included)").input_value()
    api_until = (datetime.fromisoformat(until) + timedelta(days=1)).date().isoformat()
    for group_by in ("key", "model", "day"):
        page.get_by_label("Group by").select_option(group_by)
        page.get_by_role("button", name="Show").click()
        api = gw.admin.get("/admin/usage", group_by=group_by, since=since, until=api_until)
        assert to_the_cent(page.locator("#usage-total").inner_text(), api["total_spend"])
        with page.expect_download() as download:
            page.get_by_role("link", name="Download CSV").click()
        exported = list(csv.DictReader(io.StringIO(open(download.value.path()).read())))
        assert {
            r[group_by] or None: (int(r["requests"]), Decimal(r["spend"])) for r in exported
        } == {a[group_by]: (a["requests"], Decimal(str(a["spend"]))) for a in api["data"]}
        if group_by == "key":
            shoot(page, "usage")

    # -- the ledger: filters and a request id --------------------------------------------------
    page.get_by_role("link", name="Ledger", exact=True).click()
    page.get_by_label("Outcome").select_option("rejected")
    page.get_by_role("button", name="Search").click()
    outcomes = page.locator("table.entries .outcome").all_inner_texts()
    assert outcomes and set(outcomes) == {"rejected"}
    wanted = gw.admin.get("/admin/ledger", key_id=gw.keys[0]["id"], limit=1)["data"][0]
    page.goto(gw.url + "/ui/ledger")
    page.get_by_label("Request id").fill(wanted["request_id"])
    page.get_by_role("button", name="Search").click()
    assert page.locator("table.entries tbody tr").count() == 1
    assert wanted["request_id"] in page.locator("table.entries").inner_text()
    page.goto(gw.url + "/ui/ledger")
    shoot(page, "ledger")

    # -- the API docs, offline -------------------------------------------------------------------
    page.goto(gw.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    shoot(page, "docs-swagger", check_overflow=False)
    page.goto(gw.url + "/redoc")
    page.wait_for_selector("h1")
    assert "budgetgate" in page.locator("h1").first.inner_text()
    shoot(page, "docs-redoc", check_overflow=False)

    # -- a form without its CSRF token is refused ------------------------------------------------
    page.goto(gw.url + "/ui/keys/new")
    page.get_by_label("Alias").fill("no-token")
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())")
    with page.expect_response(
        lambda r: r.url.endswith("/ui/keys/new") and r.request.method == "POST"
    ) as answer:
        page.get_by_role("button", name="Create key").click()
    assert answer.value.status == 403
    assert "security token" in page.locator(".error").inner_text()
    assert not [k for k in gw.admin.get("/admin/keys")["data"] if k["alias"] == "no-token"]
    shoot(page, "error-csrf")

    # -- sign out -------------------------------------------------------------------------------
    page.goto(gw.url + "/ui/")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/ui/login.*"))
    page.goto(gw.url + "/ui/keys")
    assert "/ui/login" in page.url
    assert [session_role(c["value"]) for c in context.cookies()] in ([], ["anonymous"])

    # -- nothing left the gateway's origin; no script or CSP error on the dashboard -----------
    assert log.urls and log.foreign() == []
    assert [page_url for page_url, _ in log.blocked if "/ui" in page_url] == []
    expected = ("status of 401 (Unauthorized)", "status of 403 (Forbidden)")  # the refusals above
    assert [
        e for e in log.console_errors if "/ui" in e.split(": ")[0] and not e.endswith(expected)
    ] == []
    context.close()


def test_the_sign_in_form_wants_its_csrf_token(browser: Any, live_gateway: LiveGateway) -> None:
    page = browser.new_page()
    page.goto(live_gateway.url + "/ui/login")
    page.get_by_label("Admin or viewer key").fill(ADMIN_KEY)
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.remove())")
    with page.expect_response(
        lambda r: r.url.endswith("/ui/login") and r.request.method == "POST"
    ) as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 403
    page.goto(live_gateway.url + "/ui/")
    assert "/ui/login" in page.url  # not signed in
    page.close()


def test_the_viewer_key_reads_without_writing(browser: Any, live_gateway: LiveGateway) -> None:
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, live_gateway.url, VIEWER_KEY)
    assert "Viewer (read-only)" in page.locator(".role").inner_text()
    page.goto(live_gateway.url + "/ui/keys")
    assert page.get_by_role("link", name="New key").count() == 0
    page.goto(live_gateway.url + f"/ui/owners/key/{live_gateway.keys[0]['id']}")
    assert page.get_by_role("link", name="Reset period").count() == 0
    response = page.goto(live_gateway.url + "/ui/keys/new")
    assert response is not None and response.status == 403
    context.close()


def test_every_page_works_with_javascript_off(browser: Any, live_gateway: LiveGateway) -> None:
    gw = live_gateway
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    sign_in(page, gw.url, ADMIN_KEY)
    assert dollars(figure(page, "fig-30d-spend")) > 50
    assert page.locator("#by-day tbody tr").count() == 30  # the chart's figures, as a table
    page.goto(gw.url + "/ui/keys/new")
    page.get_by_label("Alias").fill("no-javascript")
    page.get_by_label("Budget (US dollars)").fill("1")
    page.get_by_role("button", name="Create key").click()
    assert page.get_by_label("The new key").input_value().startswith("sk-bg-")
    page.get_by_role("link", name="Go to the key's page").click()
    assert page.locator("#budgets tbody tr").count() == 1
    page.get_by_role("link", name="Revoke").click()
    page.get_by_role("button", name="Revoke the key").click()
    assert "The key was revoked." in page.locator(".notice").inner_text()
    key_id = page.url.split("/ui/owners/key/")[1].split("?")[0]
    assert gw.admin.get(f"/admin/keys/{key_id}")["status"] == "revoked"
    shoot(page, "owner-revoked-no-javascript", javascript=False)
    page.goto(gw.url + "/ui/usage?group_by=model")
    assert page.locator("#usage tbody tr").count() >= 4
    context.close()


def test_the_keyboard_reaches_everything(browser: Any, live_gateway: LiveGateway) -> None:
    """The first Tab lands on "Skip to content", which moves the focus to the page's content;
    Tab then walks the links and forms, each with a visible focus ring, and Enter follows."""
    context = browser.new_context()
    page = context.new_page()
    sign_in(page, live_gateway.url, ADMIN_KEY)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    focused = []
    for _ in range(60):
        page.keyboard.press("Tab")
        focused.append(
            page.evaluate(
                "[document.activeElement.tagName, document.activeElement.textContent.trim(),"
                " getComputedStyle(document.activeElement).outlineStyle]"
            )
        )
    names = [text for _, text, _ in focused]
    assert "finance-bot" in names  # the owners' links in the tables
    assert all(style != "none" for tag, _, style in focused if tag in ("A", "BUTTON")), focused
    # Keys page by keyboard: the search field, typed into, and Enter submits it.
    page.goto(live_gateway.url + "/ui/keys")
    page.get_by_label("Search alias, id or prefix").focus()
    page.keyboard.type("finance")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*q=finance.*"))
    assert page.locator("#keys tbody tr").count() == 1
    context.close()


def test_a_teams_page_and_the_owners_list(browser: Any, live_gateway: LiveGateway) -> None:
    """A team with a dollar and a tokens budget, spent through a key in it: its page shows the
    bar and the entries the ledger recorded for it; the Owners list finds it, JavaScript off
    too."""
    gw = live_gateway
    team = gw.admin.post(
        "/admin/teams",
        {
            "alias": "platform-team",
            "max_budget": 1,
            "budget_duration": "1mo",
            "budgets": [{"max_budget": 5000, "unit": "tokens", "budget_duration": "1d"}],
        },
    )
    key = gw.admin.post("/admin/keys", {"alias": "platform-bot", "team_id": team["id"]})
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key["key"], max_retries=0)
    for _ in range(3):
        client.chat.completions.create(
            model="bg-test", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    client.close()
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    sign_in(page, gw.url, ADMIN_KEY)
    standing = page.locator(f'#nearest tr[data-owner="{team["id"]}"]')
    assert standing.get_by_role("link", name="platform-team").get_attribute("href") == (
        f"/ui/owners/team/{team['id']}"
    )
    page.get_by_role("link", name="Owners", exact=True).click()
    page.get_by_label("Show").select_option("team")
    page.get_by_role("button", name="Filter").click()
    page.get_by_role("link", name="platform-team").click()
    assert page.url.endswith(f"/ui/owners/team/{team['id']}")
    api_team = gw.admin.get(f"/admin/teams/{team['id']}")
    dollars_row, tokens_row = page.locator("#budgets tbody tr").all()
    assert to_the_cent(dollars_row.locator(".spend").inner_text(), api_team["spend"])
    assert "(3%)" in dollars_row.locator("svg.bar").get_attribute("aria-label")
    assert tokens_row.locator(".spend").inner_text().endswith(" tokens")
    assert page.locator("table.entries tbody tr").count() == 3
    shoot(page, "owner-team")
    page.goto(gw.url + "/ui/owners")
    shoot(page, "owners")
    context.close()

    no_script = browser.new_context(java_script_enabled=False)
    page = no_script.new_page()
    sign_in(page, gw.url, ADMIN_KEY)
    page.goto(gw.url + "/ui/owners")
    page.get_by_label("Search name or id").fill("PLATFORM")
    page.get_by_role("button", name="Filter").click()
    assert page.locator("#owners tbody tr").count() == 1
    no_script.close()

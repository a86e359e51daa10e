"""Admin API shape (SPEC 7): key objects, listing and cursors, PATCH of every setting, the
ledger newest first, usage sums, /v1/budget, health, metrics and the OpenAPI docs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.clock import ManualClock
from tests.conftest import START, Gateway, _fresh_pg_database, make_settings, running_gateway
from tests.keys.helpers import bearer, key_object, ledger, upstream_requests
from tests.pgcluster import PgCluster
from tests.servers import ServerThread

KEY_FIELDS = {
    "id",
    "alias",
    "key_prefix",
    "status",
    "max_budget",
    "budget_duration",
    "soft_budget",
    "budget_timezone",
    "budget_anchor",
    "models",
    "expires_at",
    "metadata",
    "created_at",
    "spend",
    "reserved",
    "remaining",
    "period_start",
    "reset_at",
}
# Beyond SPEC 7's list: the key's mode, its extra windows (null when there are none), its
# shrink_to_fit (SPEC 10), its alert thresholds (SPEC 12) and its scopes (SPEC 11).
OPTIONAL_FIELDS = {
    "mode",
    "budgets",
    "shrink_to_fit",
    "alert_at",
    "team_id",
    "user_id",
    "max_parallel_requests",
    "end_user_budget",
}


def assert_key_object(obj: dict, *, with_key: bool = False) -> None:
    fields = set(obj)
    assert KEY_FIELDS <= fields, KEY_FIELDS - fields
    assert fields - KEY_FIELDS <= OPTIONAL_FIELDS | ({"key"} if with_key else set()), fields
    assert ("key" in obj) is with_key


async def test_create_returns_201_with_the_flat_key_object(gateway: Gateway) -> None:
    r = await gateway.admin(
        "POST",
        "/admin/keys",
        json={
            "alias": "team-a",
            "max_budget": 10,
            "budget_duration": "1mo",
            "soft_budget": 8,
            "models": ["bg-test", "bg-priced"],
            "metadata": {"owner": "ann", "n": 1},
            "expires_at": "2026-06-01T00:00:00Z",
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert_key_object(created, with_key=True)
    assert created["id"] and created["key"].startswith(created["key_prefix"])
    expected = {
        "alias": "team-a",
        "status": "active",
        "max_budget": 10.0,
        "budget_duration": "1mo",
        "soft_budget": 8.0,
        "budget_timezone": "UTC",
        "budget_anchor": None,
        "alert_at": [],
        "models": ["bg-test", "bg-priced"],
        "expires_at": "2026-06-01T00:00:00Z",
        "metadata": {"owner": "ann", "n": 1},
        "created_at": "2026-01-15T12:00:00Z",
        "spend": 0.0,
        "reserved": 0.0,
        "remaining": 10.0,
        "period_start": "2026-01-01T00:00:00Z",
        "reset_at": "2026-02-01T00:00:00Z",
    }
    assert {k: created[k] for k in expected} == expected
    got = await key_object(gateway, created["id"])
    assert got == {k: v for k, v in created.items() if k != "key"}

    # Defaults: a lifetime, unlimited budget.
    bare = await gateway.create_key()
    assert_key_object(bare, with_key=True)
    assert (bare["max_budget"], bare["budget_duration"], bare["reset_at"]) == (None, None, None)
    assert (bare["remaining"], bare["alias"], bare["models"], bare["metadata"]) == (
        None,
        None,
        [],
        {},
    )
    assert bare["period_start"] == "2026-01-15T12:00:00Z"

    # Period boundaries in the budget's timezone (START is Thursday 2026-01-15 12:00 UTC).
    berlin = await gateway.create_key(
        max_budget=1, budget_duration="1d", budget_timezone="Europe/Berlin"
    )
    assert (berlin["period_start"], berlin["reset_at"]) == (
        "2026-01-14T23:00:00Z",
        "2026-01-15T23:00:00Z",
    )
    weekly = await gateway.create_key(max_budget=1, budget_duration="1w")
    assert (weekly["period_start"], weekly["reset_at"]) == (
        "2026-01-12T00:00:00Z",
        "2026-01-19T00:00:00Z",
    )
    anchored = await gateway.create_key(
        max_budget=1, budget_duration="30d", budget_anchor="2026-01-10T06:00:00Z"
    )
    assert anchored["budget_anchor"] == "2026-01-10T06:00:00Z"
    assert (anchored["period_start"], anchored["reset_at"]) == (
        "2026-01-10T06:00:00Z",
        "2026-02-09T06:00:00Z",
    )


async def test_budget_amounts_round_to_the_nearest_nano_dollar(gateway: Gateway) -> None:
    """0.1 + 0.2 as a client's float arithmetic sends it is a budget of 0.3, not 0.300000001
    (charges round up; amounts a user sets round to the nearest nano-dollar)."""
    r = await gateway.admin(
        "POST", "/admin/keys", content=b'{"max_budget": 0.30000000000000004, "soft_budget": 1.5e-9}'
    )
    assert r.status_code == 201, r.text
    assert (r.json()["max_budget"], r.json()["soft_budget"]) == (0.3, 2e-9)  # tie: to even
    r = await gateway.admin(
        "PATCH", f"/admin/keys/{r.json()['id']}", content=b'{"max_budget": 2.0000000015}'
    )
    assert r.status_code == 200 and r.json()["max_budget"] == 2.000000002  # tie: to even


async def test_budget_amounts_under_one_nano_dollar_are_422_naming_the_field(
    gateway: Gateway,
) -> None:
    """Above 0 but under the ledger's unit, an amount would be stored as 0 (a budget blocking
    everything): refused, not silently changed. 0 and one nano-dollar are fine."""
    key = await gateway.create_key(max_budget=1)
    cases = [
        ("POST", "/admin/keys", {"max_budget": 1e-10}, "max_budget"),
        ("POST", "/admin/keys", {"max_budget": 1, "soft_budget": 4e-10}, "soft_budget"),
        (
            "POST",
            "/admin/keys",
            {"max_budget": 1, "budgets": [{"max_budget": 9.99e-10, "budget_duration": "1d"}]},
            "budgets.0.max_budget",
        ),
        ("PATCH", f"/admin/keys/{key['id']}", {"max_budget": 5e-10}, "max_budget"),
        ("PATCH", f"/admin/keys/{key['id']}", {"soft_budget": 1e-12}, "soft_budget"),
    ]
    for method, path, body, field in cases:
        r = await gateway.admin(method, path, json=body)
        assert r.status_code == 422, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == field and f"{field}: " in error["message"], (body, error)
        assert "nano-dollar" in error["message"], error
    listed = (await gateway.admin("GET", "/admin/keys")).json()["data"]
    assert [k["id"] for k in listed] == [key["id"]]  # nothing created
    assert (await key_object(gateway, key["id"]))["max_budget"] == 1.0  # nothing changed
    for amounts in ({"max_budget": 1e-9, "soft_budget": 0}, {"max_budget": 0, "soft_budget": 0}):
        r = await gateway.admin("PATCH", f"/admin/keys/{key['id']}", json=amounts)
        assert r.status_code == 200, r.text
        assert (r.json()["max_budget"], r.json()["soft_budget"]) == (
            amounts["max_budget"],
            amounts["soft_budget"],
        )


async def test_alert_at_is_validated_sorted_and_shown_per_budget(gateway: Gateway) -> None:
    key = await gateway.create_key(
        max_budget=10,
        alert_at=[0.8, 0.5, 1],
        budgets=[{"max_budget": 1, "budget_duration": "1d", "alert_at": [0.3333, 0.9, 0.9]}],
    )
    assert key["alert_at"] == [0.5, 0.8, 1.0]
    assert [b["alert_at"] for b in key["budgets"]] == [[0.3333, 0.9]]
    assert (await key_object(gateway, key["id"]))["budgets"][0]["alert_at"] == [0.3333, 0.9]
    unlimited = await gateway.create_key()
    cases = [
        ({"max_budget": 1, "alert_at": [0]}, "alert_at.0", "greater than 0"),
        ({"max_budget": 1, "alert_at": [0.5, 1.01]}, "alert_at.1", "less than or equal to 1"),
        ({"max_budget": 1, "alert_at": [0.12345]}, "alert_at.0", "decimal places"),
        ({"max_budget": 1, "alert_at": [0.1] * 11}, "alert_at", "at most 10"),
        ({"max_budget": 1, "alert_at": "0.5"}, "alert_at", "list"),
        ({"alert_at": [0.5]}, "alert_at", "max_budget"),  # an unlimited budget: never fires
        (
            {"max_budget": 1, "budgets": [{"max_budget": 1, "alert_at": [2]}]},
            "budgets.0.alert_at.0",
            "less than or equal to 1",
        ),
    ]
    for body, field, words in cases:
        for method, path in (("POST", "/admin/keys"), ("PATCH", f"/admin/keys/{unlimited['id']}")):
            if method == "PATCH" and "budgets" in body:
                continue  # (extra windows are set on create)
            r = await gateway.admin(method, path, json=body)
            assert r.status_code == 422, (method, body, r.text)
            error = r.json()["error"]
            assert error["param"] == field and words in error["message"], (body, error)
    listed = (await gateway.admin("GET", "/admin/keys")).json()["data"]
    assert sorted(k["id"] for k in listed) == sorted([key["id"], unlimited["id"]])
    assert (await key_object(gateway, unlimited["id"]))["max_budget"] is None  # unchanged


async def test_list_keys_alias_filter_and_cursor_pagination(gateway: Gateway) -> None:
    page_ids = {(await gateway.create_key(alias="page", max_budget=1))["id"] for _ in range(5)}
    other_ids = {(await gateway.create_key(alias="other"))["id"] for _ in range(2)}

    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        params = {"alias": "page", "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await gateway.admin("GET", "/admin/keys", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"data", "next_cursor"}
        pages += 1
        assert len(body["data"]) == (2 if pages < 3 else 1)
        for obj in body["data"]:
            assert_key_object(obj)
            assert obj["alias"] == "page"
        seen += [obj["id"] for obj in body["data"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == page_ids

    everything = (await gateway.admin("GET", "/admin/keys")).json()
    assert {o["id"] for o in everything["data"]} == page_ids | other_ids
    assert everything["next_cursor"] is None
    exact = (await gateway.admin("GET", "/admin/keys", params={"limit": 7})).json()
    assert len(exact["data"]) == 7 and exact["next_cursor"] is None
    nothing = (await gateway.admin("GET", "/admin/keys", params={"alias": "nobody"})).json()
    assert nothing == {"data": [], "next_cursor": None}


async def test_patch_any_setting_returns_the_key_object(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="before", max_budget=0.01, budget_duration="1mo")
    kid = key["id"]
    assert (await gateway.chat(key["key"], max_tokens=10)).status_code == 200
    assert (await gateway.chat(key["key"], max_tokens=1)).status_code == 429

    changes = [
        ({"alias": "after"}, {"alias": "after"}),
        ({"max_budget": 2.5}, {"max_budget": 2.5, "remaining": 2.49, "spend": 0.01}),
        ({"soft_budget": 1.25}, {"soft_budget": 1.25}),
        ({"alert_at": [1, 0.5, 0.8, 0.5]}, {"alert_at": [0.5, 0.8, 1.0]}),
        ({"models": ["bg-test"]}, {"models": ["bg-test"]}),
        ({"metadata": {"team": "x"}}, {"metadata": {"team": "x"}}),
        ({"expires_at": "2027-01-01T00:00:00Z"}, {"expires_at": "2027-01-01T00:00:00Z"}),
        ({"budget_timezone": "America/New_York"}, {"budget_timezone": "America/New_York"}),
        (
            {"budget_duration": "1d"},
            {"budget_duration": "1d", "reset_at": "2026-01-16T05:00:00Z", "spend": 0.011},
        ),
        (
            {"budget_anchor": "2026-01-15T08:00:00Z"},
            {"budget_anchor": "2026-01-15T08:00:00Z", "reset_at": "2026-01-16T08:00:00Z"},
        ),
        ({"expires_at": None}, {"expires_at": None}),
        ({"soft_budget": None}, {"soft_budget": None}),
        ({"alert_at": []}, {"alert_at": []}),
        ({"alert_at": [0.25]}, {"alert_at": [0.25]}),
        ({"alert_at": None}, {"alert_at": []}),
        ({"budget_duration": None}, {"budget_duration": None, "reset_at": None}),
        ({"max_budget": None}, {"max_budget": None, "remaining": None}),
        ({"models": None}, {"models": []}),
        ({"alias": None}, {"alias": None}),
        ({}, {}),
    ]
    for body, expected in changes:
        r = await gateway.admin("PATCH", f"/admin/keys/{kid}", json=body)
        assert r.status_code == 200, (body, r.text)
        obj = r.json()
        assert_key_object(obj)
        assert obj["id"] == kid and obj["status"] == "active"
        assert {k: obj[k] for k in expected} == expected, (body, obj)
        assert await key_object(gateway, kid) == obj
        if body == {"max_budget": 2.5}:
            # Takes effect on the very next request.
            assert (await gateway.chat(key["key"], max_tokens=1)).status_code == 200
            gateway.clock.advance(1)
    # Schedule changes re-bound the open period: the one period keeps its spend throughout.
    periods = (await gateway.admin("GET", f"/admin/keys/{kid}/periods")).json()["data"]
    assert [(p["closed_at"], p["spend"]) for p in periods] == [(None, 0.011)]


async def test_ledger_newest_first_with_cursor_pagination(gateway: Gateway) -> None:
    a = await gateway.create_key(alias="a", max_budget=1)
    b = await gateway.create_key(alias="b", max_budget=1)
    ids_a: list[str] = []
    for i in range(5):
        r = await gateway.chat(a["key"], max_tokens=i + 1)
        assert r.status_code == 200
        ids_a.append(r.headers["x-request-id"])
        r = await gateway.chat(b["key"], max_tokens=1)
        gateway.clock.advance(timedelta(minutes=1))
    # Three more at the same instant: ties are ordered too, never repeated or skipped.
    for _ in range(3):
        ids_a.append((await gateway.chat(a["key"], max_tokens=2)).headers["x-request-id"])

    pages, seen, cursor = 0, [], None
    while True:
        params = {"key_id": a["id"], "limit": 3, **({"cursor": cursor} if cursor else {})}
        r = await gateway.admin("GET", "/admin/ledger", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"data", "next_cursor"}
        seen += body["data"]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert len({e["request_id"] for e in seen}) == len(seen) == 8
    assert set(ids_a) == {e["request_id"] for e in seen}
    finished = [e["finished_at"] for e in seen]
    assert finished == sorted(finished, reverse=True)
    assert [e["request_id"] for e in seen[3:]] == ids_a[4::-1]  # distinct times: newest first
    entry = seen[-1]  # the first request
    fields = {
        "request_id",
        "key_id",
        "model",
        "endpoint",
        "stream",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "cost_source",
        "outcome",
        "started_at",
        "finished_at",
    }
    assert fields <= set(entry)
    assert {k: entry[k] for k in fields - {"request_id", "started_at", "finished_at"}} == {
        "key_id": a["id"],
        "model": "bg-test",
        "endpoint": "/chat/completions",
        "stream": False,
        "prompt_tokens": 2,
        "completion_tokens": 1,
        "cost": 0.001,
        "cost_source": "prices",
        "outcome": "ok",
    }
    assert entry["finished_at"] == "2026-01-15T12:00:00Z"

    # All keys, and a time window.
    all_entries = await ledger(gateway)
    assert len(all_entries) == 13
    r = await gateway.admin(
        "GET",
        "/admin/ledger",
        params={"since": "2026-01-15T12:01:00Z", "until": "2026-01-15T12:03:00Z"},
    )
    window = r.json()["data"]
    assert len(window) == 4
    assert {e["key_id"] for e in window} == {a["id"], b["id"]}
    # Times without an offset are UTC (as in request bodies), on every database.
    r = await gateway.admin(
        "GET",
        "/admin/ledger",
        params={"since": "2026-01-15T12:01:00", "until": "2026-01-15T12:03:00"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"] == window


async def test_usage_group_by_key_model_day_exact_sums(gateway: Gateway) -> None:
    a = await gateway.create_key(alias="a", max_budget=10)
    b = await gateway.create_key(alias="b", max_budget=10)
    for _ in range(3):
        assert (await gateway.chat(a["key"], max_tokens=10)).status_code == 200  # $0.01 each
    # bg-priced: 2 prompt tokens x $100/M + 7 output tokens x $1000/M = $0.0072
    assert (await gateway.chat(a["key"], model="bg-priced", max_tokens=7)).status_code == 200
    gateway.clock.advance(timedelta(days=1))
    assert (await gateway.chat(b["key"], max_tokens=25)).status_code == 200  # $0.025
    # team-gpt is an alias of bg-priced: 2 x 100/M + 3 x 1000/M = $0.0032
    assert (await gateway.chat(b["key"], model="team-gpt", max_tokens=3)).status_code == 200

    async def report(group_by: str, **params: str) -> dict:
        r = await gateway.admin("GET", "/admin/usage", params={"group_by": group_by, **params})
        assert r.status_code == 200, r.text
        return r.json()

    by_key = await report("key")
    rows = {row["key"]: row for row in by_key["data"]}
    assert rows[a["id"]]["spend"] == 0.0372 and rows[a["id"]]["requests"] == 4
    assert rows[b["id"]]["spend"] == 0.0282 and rows[b["id"]]["requests"] == 2
    assert rows[a["id"]]["completion_tokens"] == 37 and rows[a["id"]]["prompt_tokens"] == 8
    assert by_key["total_spend"] == 0.0654

    by_model = await report("model")
    rows = {row["model"]: row["spend"] for row in by_model["data"]}
    assert rows == {"bg-test": 0.055, "bg-priced": 0.0072, "team-gpt": 0.0032}
    assert by_model["total_spend"] == 0.0654

    by_day = await report("day")
    rows = {row["day"]: row["spend"] for row in by_day["data"]}
    assert rows == {"2026-01-15": 0.0372, "2026-01-16": 0.0282}

    # The keys' own spend agrees with the ledger, to the nano-dollar.
    assert (await key_object(gateway, a["id"]))["spend"] == 0.0372
    assert (await key_object(gateway, b["id"]))["spend"] == 0.0282

    second_day = await report("key", since="2026-01-16T00:00:00Z")
    assert [(r["key"], r["spend"]) for r in second_day["data"]] == [(b["id"], 0.0282)]
    assert await report("key", since="2026-01-16T00:00:00") == second_day  # naive: UTC
    assert await report("key", since="2026-01-16") == second_day  # a date: its UTC midnight
    first_day = await report("model", until="2026-01-16T00:00:00Z")
    assert {r["model"]: r["spend"] for r in first_day["data"]} == {
        "bg-test": 0.03,
        "bg-priced": 0.0072,
    }


async def test_client_budget_endpoint(gateway: Gateway, mock_upstream: ServerThread) -> None:
    key = await gateway.create_key(
        alias="self",
        max_budget=1,
        budget_duration="1mo",
        soft_budget=0.5,
        budgets=[{"max_budget": 0.1, "budget_duration": "1d"}],
    )
    assert (await gateway.chat(key["key"], max_tokens=10)).status_code == 200
    before = await upstream_requests(mock_upstream.url)
    for headers in (bearer(key["key"]), {"api-key": key["key"]}, {"x-api-key": key["key"]}):
        r = await gateway.client.get("/v1/budget", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["alias"] == "self" and body["key_prefix"] == key["key_prefix"]
        primary, window = body["budgets"]
        assert {
            k: primary[k]
            for k in (
                "max_budget",
                "budget_duration",
                "soft_budget",
                "spend",
                "remaining",
                "period_start",
                "reset_at",
            )
        } == {
            "max_budget": 1.0,
            "budget_duration": "1mo",
            "soft_budget": 0.5,
            "spend": 0.01,
            "remaining": 0.99,
            "period_start": "2026-01-01T00:00:00Z",
            "reset_at": "2026-02-01T00:00:00Z",
        }
        assert (window["max_budget"], window["spend"], window["remaining"]) == (0.1, 0.01, 0.09)
        assert window["reset_at"] == "2026-01-16T00:00:00Z"
        assert primary["budget_anchor"] is None and "budget_anchor" in window
        assert key["key"] not in r.text
        # An authenticated response: the budget headers of the tightest budget (SPEC 3).
        assert r.headers["x-request-id"].startswith("req_")
        assert (r.headers["x-budget-spend"], r.headers["x-budget-remaining"]) == ("0.01", "0.09")
        assert r.headers["x-budget-max-budget"] == "0.1"
    assert await upstream_requests(mock_upstream.url) == before  # served, not forwarded
    # No ledger entry for checking one's budget.
    assert len(await ledger(gateway, key["id"])) == 1


async def test_health_metrics_and_docs(gateway: Gateway, mock_upstream: ServerThread) -> None:
    before = await upstream_requests(mock_upstream.url)
    r = await gateway.client.get("/healthz")
    assert r.status_code == 200
    r = await gateway.client.get("/readyz")
    assert r.status_code == 200
    r = await gateway.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in r.text
    r = await gateway.client.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "openapi.json" in r.text
    r = await gateway.client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    for path in ("/admin/keys", "/admin/keys/{key_id}", "/admin/ledger", "/admin/usage"):
        assert path in spec["paths"], path
    assert await upstream_requests(mock_upstream.url) == before  # none of it forwarded
    assert START.year == 2026


async def test_usage_by_day_is_utc_whatever_the_database_timezone(
    pg_cluster: PgCluster, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    """Days are UTC days on every database: a PostgreSQL server (or database) with another
    TimeZone setting must not move requests to another day."""
    url = _fresh_pg_database(pg_cluster)
    pg_cluster.psql(f"ALTER DATABASE {url.rsplit('/', 1)[1]} SET timezone = 'America/Los_Angeles'")
    clock.set(datetime(2026, 1, 16, 3, 0, tzinfo=UTC))  # 2026-01-15 19:00 in Los Angeles
    async with running_gateway(make_settings(url, mock_upstream.url), clock) as gw:
        key = await gw.create_key(max_budget=1)
        assert (await gw.chat(key["key"], max_tokens=10)).status_code == 200
        clock.set(datetime(2026, 1, 16, 23, 30, tzinfo=UTC))  # 15:30 in Los Angeles
        assert (await gw.chat(key["key"], max_tokens=5)).status_code == 200
        r = await gw.admin("GET", "/admin/usage", params={"group_by": "day"})
        assert r.status_code == 200, r.text
        assert [(row["day"], row["spend"]) for row in r.json()["data"]] == [("2026-01-16", 0.015)]
        entries = await ledger(gw)
        assert {e["finished_at"] for e in entries} == {
            "2026-01-16T03:00:00Z",
            "2026-01-16T23:30:00Z",
        }


async def test_schedules_whose_periods_overflow_the_calendar_are_422(gateway: Gateway) -> None:
    """A period boundary beyond what a datetime holds is the caller's invalid field, never a
    500; on creation, on an update and for an extra window alike."""
    key = await gateway.create_key(max_budget=1, budget_duration="1mo")
    for settings in (
        {"budget_duration": "999999y"},
        {"budget_duration": "99999y"},
        {"budget_duration": "5000y", "budget_anchor": "0001-01-01T00:00:00Z"},
    ):
        for method, path, body in (
            ("POST", "/admin/keys", {"max_budget": 1, **settings}),
            ("PATCH", f"/admin/keys/{key['id']}", settings),
            ("POST", "/admin/keys", {"max_budget": 1, "budgets": [{"max_budget": 1, **settings}]}),
        ):
            r = await gateway.admin(method, path, json=body)
            assert r.status_code == 422, (method, body, r.text)
            assert r.json()["error"]["param"] == "budget_duration", r.text
    got = await key_object(gateway, key["id"])
    assert got["budget_duration"] == "1mo"
    assert len((await gateway.admin("GET", "/admin/keys")).json()["data"]) == 1


async def test_times_before_the_first_utc_instant_are_422(gateway: Gateway) -> None:
    """0001-01-01T00:00+01:00 is a valid time that has no UTC value (found by the OpenAPI
    fuzzer): the caller's invalid field, never a 500."""
    key = await gateway.create_key(max_budget=1)
    early = "0001-01-01T00:00:00+01:00"
    for method, path, field in (
        ("POST", "/admin/keys", "expires_at"),
        ("POST", "/admin/keys", "budget_anchor"),
        ("PATCH", f"/admin/keys/{key['id']}", "expires_at"),
        ("PATCH", f"/admin/keys/{key['id']}", "budget_anchor"),
    ):
        r = await gateway.admin(method, path, json={field: early})
        assert r.status_code == 422, (method, field, r.text)
        error = r.json()["error"]
        assert error["param"] == field and "UTC" in error["message"], error


async def test_admin_bodies_must_be_json(gateway: Gateway) -> None:
    """`curl -d` sends a form content type: refused with 415 and a hint, never read as JSON (a
    browser may send a form cross-site without a preflight); no content type is read as JSON."""
    admin = {"authorization": f"Bearer {gateway.settings.admin_key.get_secret_value()}"}  # type: ignore[union-attr]
    body = b'{"max_budget": 1}'
    for content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain",
    ):
        r = await gateway.client.post(
            "/admin/keys", content=body, headers={**admin, "content-type": content_type}
        )
        assert r.status_code == 415, r.text
        assert r.json()["error"]["code"] == "unsupported_media_type"
        assert "application/json" in r.json()["error"]["message"]
    assert (await gateway.admin("GET", "/admin/keys")).json()["data"] == []
    for headers in ({}, {"content-type": "application/json; charset=utf-8"}):
        r = await gateway.client.post("/admin/keys", content=body, headers={**admin, **headers})
        assert r.status_code == 201, r.text

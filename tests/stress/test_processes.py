"""Process-level stress scenarios: real `budgetgate serve` replicas on one PostgreSQL ledger.

Small by default (part of `make test`); larger with STRESS=1 (`make stress`), which also
prints a table of figures after each scenario. The scenarios run in order; the last one
scans the logs of every process started by all the others for secrets.

a. concurrent admission across three replicas is exact
b. short budget periods rolled by every replica's scheduler while requests straddle them
c. PATCH / DELETE on one replica enforced by every replica on its very next request
d. PostgreSQL stopped under load: fail closed (503), recover without a restart
e. a replica SIGKILLed mid-stream: the sweeper releases and records its reservations
f. no client key nor the upstream credential in any process's logs
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.pgcluster import PgCluster, find_pg_bindir
from tests.procs import LOG_FILES, SECRETS, Fleet, auth
from tests.stress.conftest import Figures, Size, new_database
from tests.stress.ledger import CENT, PERIODS_SQL, LedgerDB, dollars
from tests.stress.workload import Sent, chat, status_summary, statuses

pytestmark = [
    pytest.mark.process,
    pytest.mark.postgres,
    pytest.mark.skipif(find_pg_bindir() is None, reason="no PostgreSQL server binaries installed"),
]

TTL = "BUDGETGATE_RESERVATION_TTL_SECONDS"
RESET = "BUDGETGATE_RESET_INTERVAL_SECONDS"


def client_for(concurrency: int, timeout: float = 120) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


def money(dollars_value: float | Decimal | str) -> str:
    """A dollar amount as the admin API gets it (a JSON number, exact in decimal)."""
    return str(Decimal(str(dollars_value)))


def reconcile_ok(fleet: Fleet) -> tuple[bool, str]:
    proc = fleet.reconcile()
    out = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, out.splitlines()[-1] if out else ""


async def released(db: LedgerDB, key_ids: list[str], within: float) -> None:
    """Wait (up to `within` s) until the keys hold no reservation."""
    for _ in range(int(within / 0.2)):
        if not await db.reservations(key_ids):
            return
        await asyncio.sleep(0.2)


# -- a ---------------------------------------------------------------------------------------


async def test_a_concurrent_admission_is_exact(fleet: Fleet, size: Size, figures: Figures) -> None:
    """Hundreds of concurrent requests, round-robin over three replicas, on keys with room for
    exactly N requests each: exactly N admitted per key, spend == max_budget, nothing held."""
    db = LedgerDB(fleet.database_url)
    room, per_key = size.a_room, size.a_per_key
    async with client_for(size.a_concurrency) as client:
        keys = [
            await fleet.create_key(
                client, replica=i % 3, alias=f"a-{i}", max_budget=money(Decimal(room) / 100)
            )
            for i in range(size.a_keys)
        ]
        jobs = [(k, j % 3 == 0) for k in keys for j in range(per_key)]  # every 3rd: streamed
        random.Random(1).shuffle(jobs)
        mock_before = await fleet.mock_requests(client)
        results: list[Sent] = await asyncio.gather(
            *(
                chat(
                    client,
                    fleet.urls[i % 3],
                    i % 3,
                    k["key"],
                    k["id"],
                    stream=stream,
                )
                for i, (k, stream) in enumerate(jobs)
            )
        )
        forwarded = await fleet.mock_requests(client) - mock_before
        key_views = {
            (k["id"], r): (await fleet.admin(client, "GET", f"/admin/keys/{k['id']}", r)).json()
            for k in keys
            for r in range(3)
        }

    ids = [k["id"] for k in keys]
    periods = await db.periods(ids)
    outcomes = await db.outcomes(ids)
    held = await db.reservations(ids)
    rec_ok, rec_line = reconcile_ok(fleet)

    by_key: dict[str, list[Sent]] = defaultdict(list)
    for r in results:
        by_key[r.key_id].append(r)
    rows = []
    for k in keys:
        st = statuses(by_key[k["id"]])
        p = [x for x in periods if x["key_id"] == k["id"]]
        rows.append(
            [
                k["alias"],
                len(by_key[k["id"]]),
                st[200],
                st[429],
                f"{dollars(sum(x['spend'] for x in p)):.2f} / {dollars(p[0]['max_budget']):.2f}",
                sum(x["reserved"] for x in p),
                status_summary(by_key[k["id"]]),
            ]
        )
    rows.append(
        [
            "total",
            len(results),
            sum(r[2] for r in rows),
            sum(r[3] for r in rows),
            f"upstream saw {forwarded}",
            len(held),
            f"reconcile: {'ok' if rec_ok else 'FAILED'}",
        ]
    )
    figures(
        f"a. concurrent admission: {size.a_keys} keys x {per_key} requests, room for {room} "
        f"each, 3 replicas",
        ["key", "sent", "admitted", "rejected", "spend / max_budget", "reserved", "statuses"],
        rows,
    )

    for k in keys:
        st = statuses(by_key[k["id"]])
        assert st[200] == room, (k["alias"], status_summary(by_key[k["id"]]))
        assert st[429] == per_key - room, (k["alias"], status_summary(by_key[k["id"]]))
        assert set(st) <= {200, 429}, status_summary(by_key[k["id"]])
        (p,) = [x for x in periods if x["key_id"] == k["id"]]
        assert p["spend"] == p["max_budget"] == room * CENT
        assert p["reserved"] == 0
        assert outcomes[k["id"]] == Counter(ok=room, rejected=per_key - room)
        for r in range(3):
            view = key_views[(k["id"], r)]
            assert Decimal(str(view["spend"])) == Decimal(room) / 100, view
            assert view["reserved"] == 0, view
    assert all(r.error_type == "budget_exceeded" for r in results if r.status == 429)
    assert all(r.detail == "" for r in results if r.status == 200), "incomplete streams"
    assert forwarded == room * len(keys)
    assert held == []
    assert rec_ok, rec_line


# -- b ---------------------------------------------------------------------------------------


async def test_b_short_periods_across_replicas(fleet: Fleet, size: Size, figures: Figures) -> None:
    """2 s and 3 s budgets over several periods, every replica's scheduler rolling them every
    0.5 s, requests of 0.3 to 3.5 s (longer than a period) in flight across every boundary."""
    db = LedgerDB(fleet.database_url)
    ttl = float(fleet.settings[TTL])
    per_period = 5
    run_for = max(size.b_periods * 2.0, 7.0)
    violations: list[str] = []
    # request id -> (period id, expires_at, when the monitor saw the reservation)
    seen_reserved: dict[str, tuple[int, datetime, datetime]] = {}
    results: list[Sent] = []
    stop = asyncio.Event()
    polls = 0

    async with client_for(size.b_keys * size.b_workers + 10) as client:
        keys = [
            await fleet.create_key(
                client,
                replica=i % 3,
                alias=f"b-{i}",
                max_budget=money(Decimal(per_period) / 100),
                budget_duration="2s" if i % 2 == 0 else "3s",
            )
            for i in range(size.b_keys)
        ]
        ids = [k["id"] for k in keys]

        async def worker(key: dict, n: int) -> None:
            rnd = random.Random(n)
            i = n
            while not stop.is_set():
                replica = i % 3
                i += 1
                delay = rnd.choice((300, 800, 1500, 2500, 3500))
                r = await chat(
                    client,
                    fleet.urls[replica],
                    replica,
                    key["key"],
                    key["id"],
                    headers={"x-mock-delay-ms": str(delay)},
                )
                results.append(r)
                if r.status != 200:
                    await asyncio.sleep(0.03)

        async def monitor() -> None:
            nonlocal polls
            conn = await db.connect()
            try:
                while not stop.is_set():
                    rows = await conn.fetch(PERIODS_SQL, ids)
                    check_periods(rows, violations, during=True)
                    held_now = await conn.fetch(
                        "SELECT request_id, period_id, expires_at FROM reservations "
                        "WHERE key_id = ANY($1::text[])",
                        ids,
                    )
                    seen_at = datetime.now(UTC)  # the reservation was committed before this
                    for r in held_now:
                        seen_reserved.setdefault(
                            r["request_id"], (r["period_id"], r["expires_at"], seen_at)
                        )
                    polls += 1
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()

        tasks = [asyncio.create_task(worker(k, n)) for k in keys for n in range(size.b_workers)]
        mon = asyncio.create_task(monitor())
        await asyncio.sleep(run_for)
        stop.set()
        await asyncio.gather(*tasks, mon)
        await asyncio.sleep(1.2)  # let the schedulers roll the periods that just ended
        views = [
            (await fleet.admin(client, "GET", f"/admin/keys/{k['id']}", i % 3)).json()
            for i, k in enumerate(keys)
        ]

    periods = await db.periods(ids)
    check_periods(periods, violations, during=False)
    entries = {e["request_id"]: e for e in await db.entries(ids)}
    held = await db.reservations(ids)
    rec_ok, rec_line = reconcile_ok(fleet)

    # Every admitted request charged to the period it was admitted in.
    wrong: list[str] = []
    straddled = straddled_seen = checked_exact = 0
    for r in results:
        if r.status != 200:
            continue
        e = entries.get(r.request_id)
        if e is None:
            wrong.append(f"{r.request_id}: no ledger entry")
            continue
        if e["outcome"] != "ok" or e["cost"] != CENT or e["period_id"] is None:
            wrong.append(f"{r.request_id}: {dict(e)}")
            continue
        straddles = e["period_end"] is not None and e["finished_at"] > e["period_end"]
        straddled += straddles
        # Bounds that need no timing tolerance: the request started before its period ended
        # and finished after it began.
        if not (e["started_at"] < e["period_end"] and e["period_start"] <= e["finished_at"]):
            wrong.append(
                f"{r.request_id}: ran {e['started_at']} to {e['finished_at']}, charged to "
                f"[{e['period_start']}, {e['period_end']})"
            )
        if r.request_id in seen_reserved:
            # Seen held by the monitor: it must be charged to the very period it was reserved
            # in, and that period was open at some point while it was being admitted (after
            # the reserve transaction began, before the monitor saw it).
            period_id, expires_at, seen_at = seen_reserved[r.request_id]
            txn_began = expires_at - timedelta(seconds=ttl)
            checked_exact += 1
            straddled_seen += straddles
            if period_id != e["period_id"]:
                wrong.append(f"{r.request_id}: reserved in {period_id}, charged {e['period_id']}")
            elif not (
                txn_began < e["period_end"] + timedelta(milliseconds=1)
                and e["period_start"] <= seen_at
            ):
                wrong.append(
                    f"{r.request_id}: admitted between {txn_began} and {seen_at}, outside "
                    f"[{e['period_start']}, {e['period_end']})"
                )
    for r in results:
        if r.status == 429:
            e = entries.get(r.request_id)
            if e is None or e["outcome"] != "rejected" or e["period_id"] is not None:
                wrong.append(f"{r.request_id}: rejected but ledger says {e and dict(e)}")

    by_budget: dict[str, list] = defaultdict(list)
    for p in periods:
        by_budget[p["budget_id"]].append(p)
    alias = {k["id"]: k["alias"] for k in keys}
    rows = []
    for budget_periods in by_budget.values():
        closed = [p for p in budget_periods if p["closed_at"] is not None]
        key_id = budget_periods[0]["key_id"]
        mine = [r for r in results if r.key_id == key_id]
        rows.append(
            [
                alias[key_id],
                next(k["budget_duration"] for k in keys if k["id"] == key_id),
                len(mine),
                statuses(mine)[200],
                statuses(mine)[429],
                len(closed),
                sum(p["spend"] == p["max_budget"] for p in closed),
                f"{dollars(max(p['spend'] for p in budget_periods)):.2f} / "
                f"{dollars(budget_periods[0]['max_budget']):.2f}",
                len(budget_periods) - len(closed),
                sum(p["reserved"] for p in budget_periods),
            ]
        )
    rows.append(
        [
            "total",
            "",
            len(results),
            statuses(results)[200],
            statuses(results)[429],
            sum(r[5] for r in rows),
            sum(r[6] for r in rows),
            f"seen reserved {checked_exact}; straddled {straddled} ({straddled_seen} seen)",
            f"polls {polls}",
            f"reconcile {'ok' if rec_ok else 'FAILED'}",
        ]
    )
    figures(
        f"b. short periods: {size.b_keys} keys x {size.b_workers} workers for {run_for:.0f} s, "
        f"max_budget $0.05 per period, statuses {status_summary(results)}",
        [
            "key",
            "duration",
            "sent",
            "admitted",
            "rejected",
            "closed periods",
            "full",
            "max spend / max_budget",
            "open",
            "reserved",
        ],
        rows,
    )

    assert violations == [], violations[:10]
    assert wrong == [], wrong[:10]
    assert set(statuses(results)) <= {200, 429}, status_summary(results)
    for budget_periods in by_budget.values():
        assert sum(p["closed_at"] is not None for p in budget_periods) >= 2
    assert straddled_seen >= 1, "no request was seen straddling a period boundary"
    # Resets touch nothing but the period: the budget's settings are as created.
    for k, view in zip(keys, views, strict=True):
        assert (view["max_budget"], view["budget_duration"]) == (0.05, k["budget_duration"])
    assert {p["max_budget"] for p in periods} == {per_period * CENT}
    assert held == []
    assert rec_ok, rec_line


def check_periods(rows: list, violations: list[str], during: bool) -> None:
    when = "during the run" if during else "after the run"
    open_count: Counter[str] = Counter()
    budgets = set()
    for p in rows:
        budgets.add(p["budget_id"])
        if p["closed_at"] is None:
            open_count[p["budget_id"]] += 1
            if p["spend"] + p["reserved"] > p["max_budget"]:
                violations.append(f"{when}: open period {p['id']} holds more than max_budget")
        elif p["spend"] > p["max_budget"]:
            violations.append(f"{when}: closed period {p['id']} spent {p['spend']}")
        if p["reserved"] < 0 or p["spend"] < 0:
            violations.append(f"{when}: period {p['id']} negative")
        if not during and p["reserved"] != 0:
            violations.append(f"{when}: period {p['id']} still reserves {p['reserved']}")
    for b in budgets:
        if open_count[b] != 1:
            violations.append(f"{when}: budget {b} has {open_count[b]} open periods")


# -- c ---------------------------------------------------------------------------------------


async def test_c_admin_changes_reach_every_replica(
    fleet: Fleet, size: Size, figures: Figures
) -> None:
    """PATCH max_budget to 0 and back up, and DELETE (revoke), each on one replica, are
    enforced by every replica on its very next request, under background load."""
    stop = asyncio.Event()
    background: list[Sent] = []
    rounds: list[list] = []
    revocations: list[list] = []
    async with client_for(size.c_background + 20) as client:
        bg = await fleet.create_key(client, alias="c-background", max_budget=money(1000))

        async def load(n: int) -> None:
            i = n
            while not stop.is_set():
                replica = i % 3
                i += 1
                background.append(
                    await chat(client, fleet.urls[replica], replica, bg["key"], bg["id"])
                )

        async def on_each_replica(key: dict) -> list[Sent]:
            return list(
                await asyncio.gather(
                    *(chat(client, fleet.urls[r], r, key["key"], key["id"]) for r in range(3))
                )
            )

        tasks = [asyncio.create_task(load(n)) for n in range(size.c_background)]
        try:
            key = await fleet.create_key(client, alias="c-main", max_budget=money("0.05"))
            assert [s.status for s in await on_each_replica(key)] == [200, 200, 200]
            for rnd in range(size.c_rounds):
                down, up = rnd % 3, (rnd + 1) % 3
                r = await fleet.admin(
                    client, "PATCH", f"/admin/keys/{key['id']}", down, json={"max_budget": 0}
                )
                assert r.status_code == 200, r.text
                assert r.json()["max_budget"] == 0
                after_down = await on_each_replica(key)
                spend = Decimal(str(r.json()["spend"]))
                r = await fleet.admin(
                    client,
                    "PATCH",
                    f"/admin/keys/{key['id']}",
                    up,
                    json={"max_budget": money(spend + Decimal("0.03"))},
                )
                assert r.status_code == 200, r.text
                after_up = await on_each_replica(key)  # room for exactly these three
                extra = await chat(client, fleet.urls[down], down, key["key"], key["id"])
                rounds.append([rnd, down, after_down, up, after_up, extra])
                assert [s.status for s in after_down] == [429, 429, 429], status_summary(after_down)
                assert all(s.error_type == "budget_exceeded" for s in after_down)
                assert [s.status for s in after_up] == [200, 200, 200], status_summary(after_up)
                assert extra.status == 429, extra

            for j in range(size.c_revoked):
                victim = await fleet.create_key(client, alias=f"c-revoked-{j}", max_budget="1")
                before = await on_each_replica(victim)
                assert [s.status for s in before] == [200, 200, 200]
                r = await fleet.admin(client, "DELETE", f"/admin/keys/{victim['id']}", j % 3)
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "revoked"
                after = await on_each_replica(victim)
                revocations.append([victim["alias"], j % 3, after])
                assert [s.status for s in after] == [401, 401, 401], status_summary(after)
                assert all(s.error_type == "authentication_error" for s in after)
                assert all(victim["key"] not in s.body for s in after)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    rec_ok, rec_line = reconcile_ok(fleet)
    rows = [
        [
            f"round {rnd}: PATCH 0 on {down}",
            " ".join(str(s.status) for s in after_down),
            f"PATCH +$0.03 on {up}",
            " ".join(str(s.status) for s in after_up),
            extra.status,
        ]
        for rnd, down, after_down, up, after_up, extra in rounds
    ]
    rows += [
        [f"{alias}: DELETE on {rep}", " ".join(str(s.status) for s in after), "", "", ""]
        for alias, rep, after in revocations
    ]
    rows.append(
        [
            f"background: {len(background)} requests",
            status_summary(background),
            "",
            "",
            f"reconcile {'ok' if rec_ok else 'FAILED'}",
        ]
    )
    figures(
        "c. admin changes on one replica, next request on every replica (0, 1, 2)",
        ["change", "next requests", "then", "next requests", "4th request"],
        rows,
    )
    assert set(statuses(background)) == {200}, status_summary(background)
    assert rec_ok, rec_line


# -- d ---------------------------------------------------------------------------------------

FORWARDED_OUTCOMES = ("ok", "upstream_error", "timeout", "client_disconnect")


async def test_d_postgres_outage_fails_closed_and_recovers(
    size: Size, figures: Figures, tmp_path: Path
) -> None:
    """PostgreSQL stopped under load: every replica answers 503 (OpenAI error body,
    service_unavailable), /readyz 503, and forwards nothing; restarted: the replicas recover
    by themselves, and every request the upstream saw is in the ledger."""
    cluster = PgCluster()
    try:
        cluster.start()
        LOG_FILES.append(cluster.log_file)
        # The throwaway cluster trades durability for speed (synchronous_commit=off): a commit
        # could be lost in the immediate (crash) shutdown below. Production-like here.
        cluster.psql("ALTER SYSTEM SET synchronous_commit = on")
        cluster.psql("SELECT pg_reload_conf()")
        url = new_database(cluster)
        env = {TTL: "3", RESET: "0.5", "BUDGETGATE_DB_POOL_SIZE": str(size.d_pool)}
        # Replica 2 runs no maintenance pass in practice (1 h): its request path alone meets
        # whatever the outage left in its connection pool.
        quiet = {2: {RESET: "3600"}}
        with Fleet(tmp_path, url, replicas=3, env=env, replica_env=quiet) as fleet:
            await _outage_scenario(fleet, cluster, url, size, figures)
    finally:
        cluster.cleanup()


async def _outage_scenario(
    fleet: Fleet, cluster: PgCluster, url: str, size: Size, figures: Figures
) -> None:
    db = LedgerDB(url)
    stop = asyncio.Event()
    results: list[Sent] = []
    marks: dict[str, float] = {}
    async with client_for(size.d_workers + 300) as client:
        keys = [
            await fleet.create_key(client, alias=f"d-{i}", max_budget=money(1000)) for i in range(3)
        ]
        ids = [k["id"] for k in keys]

        async def worker(n: int) -> None:
            rnd = random.Random(n)
            i = n
            while not stop.is_set():
                replica, key = i % 3, keys[(i // 3) % 3]
                i += 1
                r = await chat(
                    client,
                    fleet.urls[replica],
                    replica,
                    key["key"],
                    key["id"],
                    stream=i % 4 == 0,
                    headers={"x-mock-delay-ms": str(rnd.choice((0, 20, 50)))},
                )
                results.append(r)
                if r.status != 200:
                    await asyncio.sleep(0.05)

        async def readyz() -> list[httpx.Response]:
            return list(await asyncio.gather(*(client.get(u + "/readyz") for u in fleet.urls)))

        tasks = [asyncio.create_task(worker(n)) for n in range(size.d_workers)]
        try:
            await asyncio.sleep(1.0)
            marks["stop"] = time.time()
            await asyncio.to_thread(cluster.stop, "fast")
            marks["stopped"] = time.time()
            await asyncio.sleep(0.5)  # requests forwarded just before the stop finish
            forwarded_at_stop = await fleet.mock_requests(client)
            ready_down = await readyz()
            await asyncio.sleep(size.d_outage)
            forwarded_in_outage = await fleet.mock_requests(client) - forwarded_at_stop
            marks["start"] = time.time()
            await asyncio.to_thread(cluster.start)
            marks["started"] = time.time()

            recovered: dict[int, float] = {}
            deadline = time.monotonic() + 30
            while len(recovered) < 3 and time.monotonic() < deadline:
                for rep in set(range(3)) - set(recovered):
                    r = await chat(client, fleet.urls[rep], rep, keys[0]["key"], keys[0]["id"])
                    if r.status == 200:
                        recovered[rep] = time.time() - marks["started"]
                await asyncio.sleep(0.1)
            ready_up = await readyz()
            marks["burst"] = time.time()
            burst: list[Sent] = list(
                await asyncio.gather(
                    *(
                        chat(
                            client, fleet.urls[i % 3], i % 3, keys[i % 3]["key"], keys[i % 3]["id"]
                        )
                        # more at once than pool_size + max_overflow connections per replica
                        for i in range(3 * (2 * size.d_pool + 10))
                    )
                )
            )
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        # An idle restart (no request while PostgreSQL is down): the next requests on the
        # quiet replica must not be answered from connections the restart closed.
        n = 2 * size.d_pool + 5
        warm = await asyncio.gather(
            *(
                chat(client, fleet.urls[2], 2, keys[i % 3]["key"], keys[i % 3]["id"])
                for i in range(n)
            )
        )
        await asyncio.to_thread(cluster.restart, "immediate")
        after_idle_restart: list[Sent] = list(
            await asyncio.gather(
                *(
                    chat(client, fleet.urls[2], 2, keys[i % 3]["key"], keys[i % 3]["id"])
                    for i in range(n)
                )
            )
        )
        # ... nor the admin API and the readiness probe (the SQLAlchemy engine's pool).
        admin_after_idle_restart = [
            (await client.get(fleet.urls[2] + "/readyz")).status_code,
            (await fleet.admin(client, "GET", f"/admin/keys/{keys[0]['id']}", 2)).status_code,
        ]

        # The sweeper releases what could not be settled while the database was down.
        await released(db, ids, within=30)
        forwarded_total = await fleet.mock_requests(client)

    held = await db.reservations(ids)
    outcomes = Counter()
    for c in (await db.outcomes(ids)).values():
        outcomes.update(c)
    entries = {e["request_id"]: e for e in await db.entries(ids)}
    periods = await db.periods(ids)
    rec_ok, rec_line = reconcile_ok(fleet)

    settled_forwarded = sum(outcomes[o] for o in FORWARDED_OUTCOMES)
    # Seconds from PostgreSQL accepting connections again to each replica's first 200 (any
    # request; under this load a single answer takes a while, so this is an upper bound).
    first_ok = {
        rep: round(
            min(
                r.done_at - marks["started"]
                for r in results + burst
                if r.replica == rep and r.status == 200 and r.done_at > marks["started"]
            ),
            2,
        )
        for rep in recovered
    }
    in_outage = [r for r in results if marks["stopped"] <= r.sent_at and r.done_at < marks["start"]]
    phases = {
        "before stop": [r for r in results if r.sent_at < marks["stop"]],
        "stopping": [r for r in results if marks["stop"] <= r.sent_at < marks["stopped"]],
        "outage": [r for r in results if marks["stopped"] <= r.sent_at < marks["start"]],
        "restarting": [r for r in results if marks["start"] <= r.sent_at < marks["burst"]],
        "after": [r for r in results if r.sent_at >= marks["burst"]],
        "recovery burst": burst,
        "idle restart, replica 2": after_idle_restart,
    }
    admitted_missing = [
        r.request_id
        for r in results + burst + after_idle_restart
        if r.status == 200
        and (
            r.request_id not in entries
            or entries[r.request_id]["outcome"] not in ("ok", "abandoned")
        )
    ]
    figures(
        f"d. PostgreSQL stopped for {size.d_outage:.0f} s under load ({size.d_workers} workers, "
        f"3 replicas); /readyz down {[r.status_code for r in ready_down]}, "
        f"up {[r.status_code for r in ready_up]}; first 200 per replica after the restart "
        f"{first_ok} s",
        ["phase", "requests", "statuses"],
        [[name, len(rs), status_summary(rs)] for name, rs in phases.items()]
        + [
            ["ledger outcomes", sum(outcomes.values()), dict(outcomes)],
            [
                "upstream saw",
                forwarded_total,
                f"settled+forwarded {settled_forwarded}, abandoned {outcomes['abandoned']}, "
                f"during outage {forwarded_in_outage}",
            ],
            ["idle restart, replica 2: /readyz, admin GET", 2, admin_after_idle_restart],
            ["reservations left", len(held), f"reconcile {'ok' if rec_ok else 'FAILED'}"],
        ],
    )

    assert all(r.status_code == 503 for r in ready_down), [r.text for r in ready_down]
    assert all(r.json()["error"]["type"] == "service_unavailable" for r in ready_down)
    assert in_outage, "no request was sent during the outage"
    assert {r.status for r in in_outage} == {503}, status_summary(in_outage)
    unavailable = [r for r in results + burst if r.status == 503]
    assert all(r.error_type == "service_unavailable" for r in unavailable), unavailable[:3]
    assert set(statuses(results)) <= {200, 503}, status_summary(results)
    assert forwarded_in_outage == 0
    assert sorted(recovered) == [0, 1, 2], f"replicas not recovered: {recovered}"
    assert all(r.status_code == 200 for r in ready_up), [r.text for r in ready_up]
    assert set(statuses(burst)) == {200}, status_summary(burst)
    assert set(statuses(warm)) == {200}, status_summary(warm)
    assert set(statuses(after_idle_restart)) == {200}, status_summary(after_idle_restart)
    assert admin_after_idle_restart == [200, 200]
    assert held == []
    assert all(p["reserved"] == 0 for p in periods)
    # Fail closed: the upstream saw only requests the ledger had reserved; each is recorded.
    assert settled_forwarded <= forwarded_total <= settled_forwarded + outcomes["abandoned"]
    assert admitted_missing == []
    assert rec_ok, rec_line


# -- e ---------------------------------------------------------------------------------------


async def test_e_crashed_replica_reservations_are_swept(
    stress_pg: PgCluster, size: Size, figures: Figures, tmp_path: Path
) -> None:
    """A replica SIGKILLed while slow streams run; restarted with a short reservation TTL, its
    reservations are settled as `abandoned`, each charged its full reservation, and the keys'
    reserved is 0."""
    url = new_database(stress_pg)
    db = LedgerDB(url)
    with Fleet(tmp_path, url, replicas=1, env={TTL: "120", RESET: "0.5"}) as fleet:
        gw = fleet.gateways[0]
        async with client_for(size.e_streams + 10) as client:
            keys = [
                await fleet.create_key(client, alias=f"e-{i}", max_budget=money(10))
                for i in range(2)
            ]
            ids = [k["id"] for k in keys]
            started = 0
            all_started = asyncio.Event()
            outcomes: list[str] = []

            async def stream(n: int) -> None:
                nonlocal started
                key = keys[n % 2]
                body = {
                    "model": "bg-test",
                    "messages": [{"role": "user", "content": "hello"}],
                    "max_tokens": 50,
                    "stream": True,
                }
                headers = auth(key["key"], **{"x-mock-delay-ms": "200"})
                try:
                    async with client.stream(
                        "POST", gw.url + "/v1/chat/completions", json=body, headers=headers
                    ) as r:
                        assert r.status_code == 200, await r.aread()
                        async for chunk in r.aiter_text():
                            if "tok0" in chunk:
                                started += 1
                                if started == size.e_streams:
                                    all_started.set()
                    outcomes.append("completed")
                except httpx.HTTPError as exc:
                    outcomes.append(type(exc).__name__)

            tasks = [asyncio.create_task(stream(n)) for n in range(size.e_streams)]
            await asyncio.wait_for(all_started.wait(), timeout=60)
            held_before = await db.reservations(ids)
            gw.kill()
            await asyncio.gather(*tasks)
            held_after_crash = await db.reservations(ids)

            t0 = time.monotonic()
            gw.start(env={TTL: "2", RESET: "0.5"})
            await released(db, ids, within=30)
            released_after = time.monotonic() - t0
            held_final = await db.reservations(ids)
            ledger = []
            views = []
            for k in keys:
                r = await fleet.admin(client, "GET", f"/admin/ledger?key_id={k['id']}&limit=1000")
                assert r.status_code == 200, r.text
                ledger += r.json()["data"]
                views.append((await fleet.admin(client, "GET", f"/admin/keys/{k['id']}")).json())
            again = [await chat(client, gw.url, 0, k["key"], k["id"], max_tokens=10) for k in keys]
            forwarded = await fleet.mock_requests(client)
        rec_ok, rec_line = reconcile_ok(fleet)

    by_outcome = Counter(e["outcome"] for e in ledger)
    figures(
        f"e. replica SIGKILLed with {size.e_streams} slow streams open (50 x 200 ms), "
        f"restarted with a 2 s TTL",
        ["what", "figure"],
        [
            ["streams open at the kill", len(held_before)],
            ["client side", dict(Counter(outcomes))],
            ["reservations after the crash", len(held_after_crash)],
            ["reserved at the crash ($)", dollars(sum(r["amount"] for r in held_after_crash))],
            ["released within (s after restart)", round(released_after, 1)],
            ["reservations left", len(held_final)],
            ["ledger outcomes", dict(by_outcome)],
            ["keys' reserved after", [v["reserved"] for v in views]],
            ["requests after restart", [s.status for s in again]],
            ["upstream saw", forwarded],
            ["reconcile", "ok" if rec_ok else f"FAILED {rec_line}"],
        ],
    )

    assert len(held_before) == size.e_streams
    assert all(r["amount"] == 5 * CENT for r in held_before)
    assert "completed" not in outcomes
    assert len(held_after_crash) == size.e_streams, "a crashed replica settled something?"
    assert held_final == [], f"{len(held_final)} reservations still held after the restart"
    abandoned = [e for e in ledger if e["outcome"] == "abandoned"]
    assert len(abandoned) == size.e_streams
    assert {e["request_id"] for e in abandoned} == {r["request_id"] for r in held_before}
    assert all(e["stream"] for e in abandoned)
    assert {(e["cost"], e["cost_source"]) for e in abandoned} == {(0.05, "reservation")}
    assert [v["reserved"] for v in views] == [0, 0]
    held_per_key = Counter(r["key_id"] for r in held_before)
    assert [Decimal(str(v["spend"])) for v in views] == [
        held_per_key[k["id"]] * Decimal("0.05") for k in keys
    ]
    assert [s.status for s in again] == [200, 200]
    assert rec_ok, rec_line


# -- f ---------------------------------------------------------------------------------------


async def test_f_logs_hold_no_secrets(fleet: Fleet, size: Size, figures: Figures) -> None:
    """After everything above (and a few error paths here), no process's log holds a client
    key, the upstream credential or the admin key."""
    bogus = "sk-bg-" + "Zq" * 20  # a well-formed key nobody issued
    SECRETS.add(bogus)
    async with client_for(20) as client:
        key = await fleet.create_key(client, alias="f-key", max_budget=money("0.02"))
        revoked = await fleet.create_key(client, alias="f-revoked", max_budget=money(1))
        await fleet.admin(client, "DELETE", f"/admin/keys/{revoked['id']}", 1)
        url = fleet.urls[2]
        probes = [
            await chat(client, url, 2, key["key"], key["id"], headers={"x-mock-status": "500"}),
            await chat(
                client,
                url,
                2,
                key["key"],
                key["id"],
                stream=True,
                headers={"x-mock-die-after": "3"},
            ),
            await chat(client, url, 2, revoked["key"], revoked["id"]),
            await chat(client, url, 2, bogus, "-"),
            await chat(client, url, 2, key["key"], key["id"], max_tokens=5000),  # over budget
            await chat(client, url, 2, key["key"], key["id"], max_tokens=10),
        ]
        r = await client.post(
            url + "/v1/chat/completions",
            content=b"{not json",
            headers={"x-api-key": key["key"], "content-type": "application/json"},
        )
        probes_extra = [r.status_code]
        r = await client.get(url + "/admin/keys", headers={"authorization": f"Bearer {key['key']}"})
        probes_extra.append(r.status_code)

    logs = [p for p in dict.fromkeys(LOG_FILES) if p.exists()]
    leaks = []
    lines = 0
    for path in logs:
        text = path.read_text(errors="replace")
        lines += text.count("\n")
        for secret in SECRETS:
            if secret in text:
                leaks.append(f"{path.name}: {secret[:10]}…")
    figures(
        "f. secrets in logs",
        ["what", "figure"],
        [
            ["log files scanned", len(logs)],
            ["log lines", lines],
            ["secrets looked for (client keys + upstream + admin)", len(SECRETS)],
            ["error-path probes", [s.status for s in probes] + probes_extra],
            ["leaks", leaks or "none"],
        ],
    )
    assert [s.status for s in probes] == [500, 200, 401, 401, 429, 200], [
        (s.status, s.body) for s in probes
    ]
    assert probes_extra == [400, 401]
    assert len(logs) >= 4
    assert leaks == []

"""Operating it (SPEC 12): one JSON access line per proxied request, every log line of a request
carrying its id, nothing secret in any of them; Prometheus metrics with bounded labels, summed
over every worker of `budgetgate serve --workers N`; an optional token on /metrics."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from app.clock import ManualClock
from app.main import create_app
from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, make_settings, running_gateway
from tests.keys.helpers import bearer
from tests.pgcluster import PgCluster
from tests.procs import ManagedProcess, base_env, budgetgate_bin, chat_body, free_port
from tests.servers import ServerThread

CHAT = {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def sample(page: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in page.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_one_access_line_per_proxied_request_and_nothing_secret(
    database_url: str,
    mock_upstream: ServerThread,
    clock: ManualClock,
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings(database_url, mock_upstream.url, log_format="json")
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(alias="team-a", max_budget=0.02, budget_duration="1d")
        k = key["key"]
        capfd.readouterr()
        sent = []
        for method, path, body in [
            ("POST", "/v1/chat/completions", CHAT),
            ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
            ("GET", "/v1/models", None),
            ("POST", "/v1/files", {}),
            ("POST", "/v1/chat/completions", {**CHAT, "max_tokens": 100_000}),  # 429
        ]:
            r = await gw.client.request(method, path, json=body, headers=bearer(k))
            sent.append((r.headers["x-request-id"], r.status_code))
        err = capfd.readouterr().err

    access = [e for e in json_lines(err) if e.get("logger") == "budgetgate.access"]
    assert [(e["request_id"], e["status"]) for e in access] == sent
    first, streamed, models, refused, rejected = access
    assert (first["method"], first["route"], first["model"], first["outcome"]) == (
        "POST",
        "/chat/completions",
        "bg-test",
        "ok",
    )
    assert first["key_id"] == key["id"] and first["key_alias"] == "team-a"
    assert first["cost"] == 0.005 and first["reservation"] == 0.005
    assert first["upstream_status"] == 200
    assert first["latency_ms"] >= first["upstream_latency_ms"] > 0
    assert (streamed["outcome"], streamed["cost"]) == ("ok", 0.005)
    assert (models["route"], models["outcome"], models["cost"]) == ("/models", None, None)
    assert (refused["route"], refused["upstream_status"]) == ("unmatched", None)
    assert (rejected["outcome"], rejected["upstream_status"]) == ("rejected", None)
    for secret in (k, UPSTREAM_KEY, ADMIN_KEY):
        assert secret not in err


async def test_log_lines_written_during_a_request_carry_its_id(
    database_url: str, clock: ManualClock, capfd: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(database_url, dead, log_format="json")
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(max_budget=1.0)
        capfd.readouterr()
        r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=bearer(key["key"]))
        assert r.status_code == 502
        err = capfd.readouterr().err
    warning = [e for e in json_lines(err) if e["message"].startswith("upstream unreachable")]
    assert warning and warning[0]["request_id"] == r.headers["x-request-id"], err


async def test_metrics_count_requests_spend_and_rejections(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(database_url, mock_upstream.url)
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(max_budget=0.02, budget_duration="1d")
        before = (await gw.client.get("/metrics")).text
        for _ in range(3):
            r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=bearer(key["key"]))
            assert r.status_code == 200
        big = {**CHAT, "max_tokens": 100_000}
        r = await gw.client.post("/v1/chat/completions", json=big, headers=bearer(key["key"]))
        assert r.status_code == 429
        r = await gw.client.post("/v1/../x", json={}, headers=bearer(key["key"]))
        after = (await gw.client.get("/metrics")).text

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    ok = {"route": "/chat/completions", "model": "bg-test", "status": "200", "outcome": "ok"}
    assert delta("budgetgate_requests_total", **ok) == 3
    assert delta("budgetgate_requests_total", status="429", outcome="rejected") == 1
    assert delta("budgetgate_spend_dollars_total", model="bg-test") == pytest.approx(0.015)
    assert delta("budgetgate_rejections_total", scope="key") == 1
    assert delta("budgetgate_ledger_seconds_count", step="admit") == 4
    assert delta("budgetgate_ledger_seconds_count", step="settle") == 3
    assert delta("budgetgate_upstream_seconds_count", route="/chat/completions") == 3
    assert sample(after, "budgetgate_reservations_open") == 0
    # Labels never carry a raw path or a key.
    assert "/v1/../x" not in after and key["key"] not in after and key["id"] not in after


async def test_metrics_token(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(database_url, mock_upstream.url, metrics_token="scrape-me")
    async with running_gateway(settings, clock) as gw:
        for headers in ({}, {"authorization": "Bearer wrong"}, bearer(ADMIN_KEY)):
            r = await gw.client.get("/metrics", headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_metrics_token"
        r = await gw.client.get("/metrics", headers=bearer("scrape-me"))
        assert r.status_code == 200 and "budgetgate_requests_total" in r.text


def served_by_worker(metrics_dir: Path) -> list[float]:
    """budgetgate_requests_total as each worker's own sample file holds it."""
    served = []
    for path in sorted(metrics_dir.glob("counter_*.db")):
        total = 0.0
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "budgetgate_requests_total":
                total += value
        served.append(total)
    return served


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_are_summed_over_every_worker(
    pg_cluster: PgCluster, tmp_path: Path, workers: int
) -> None:
    """Under `serve --workers 2` each scrape lands on either worker and must show both
    workers' requests (and one worker's, its own); the startup line names the database
    without its password."""
    bin_ = budgetgate_bin()
    mock = ManagedProcess(
        "mock",
        [bin_, "mock-upstream", "--port", str(port := free_port())],
        base_env(),
        tmp_path,
        port,
        health_path="/mock/stats",
    )
    name = f"metrics_workers_{workers}"
    pg_cluster.psql(f"CREATE DATABASE {name} TEMPLATE bg_template")
    url = pg_cluster.url(name).replace("@", ":hunter2pw@", 1)
    env = base_env() | {
        "BUDGETGATE_DATABASE_URL": url,
        "BUDGETGATE_UPSTREAM_URL": mock.url,
        "BUDGETGATE_ADMIN_KEY": ADMIN_KEY,
        "BUDGETGATE_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "BUDGETGATE_PRICES_FILE": str(Path(__file__).parents[1] / "data" / "prices.yaml"),
        "BUDGETGATE_LOG_FORMAT": "json",
    }
    # The workers' sample files, where this test can see which worker served what.
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    port = free_port()
    argv = [bin_, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    gateway = ManagedProcess("gateway", argv, env, tmp_path, port)
    try:
        mock.start()
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            r = client.post("/admin/keys", json={"max_budget": 100}, headers=bearer(ADMIN_KEY))
            key = r.json()["key"]
            sent = 0
            # Until every worker has served some (a fresh connection each time).
            while sent < 40 or len([n for n in served_by_worker(metrics_dir) if n]) < workers:
                assert sent < 400, served_by_worker(metrics_dir)
                r = httpx.post(gateway.url + "/v1/chat/completions", json=chat_body(5),
                               headers=bearer(key), timeout=30)  # fmt: skip
                assert r.status_code == 200, r.text
                sent += 1
            assert sum(served_by_worker(metrics_dir)) == sent
            for _ in range(10):
                page = httpx.get(gateway.url + "/metrics", timeout=30).text
                assert sample(page, "budgetgate_requests_total", status="200") == sent, page
        lines = json_lines(gateway.stderr_path.read_text())
        access = [e for e in lines if e.get("logger") == "budgetgate.access"]
        assert len(access) == sent
        starting = [e for e in lines if e.get("message") == "budgetgate starting"]
        assert len(starting) == 1 and starting[0]["workers"] == workers
        assert starting[0]["database"].endswith(f"/{name}")
        assert "hunter2pw" not in gateway.stderr_path.read_text()
    finally:
        gateway.kill()
        mock.kill()


async def test_readiness_can_include_the_upstream(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    """/readyz stays about the ledger unless BUDGETGATE_READY_CHECKS_UPSTREAM is on; then an
    upstream that refuses connections makes it 503 (and one that accepts, 200)."""
    dead = f"http://127.0.0.1:{free_port()}"
    for checks, status in ((False, 200), (True, 503)):
        settings = make_settings(database_url, dead, ready_checks_upstream=checks)
        async with running_gateway(settings, clock) as gw:
            r = await gw.client.get("/readyz")
            assert r.status_code == status, r.text
            if status == 503:
                assert r.json()["error"]["code"] == "upstream_unreachable"
    settings = make_settings(database_url, mock_upstream.url, ready_checks_upstream=True)
    async with running_gateway(settings, clock) as gw:
        assert (await gw.client.get("/readyz")).status_code == 200


def test_access_lines_for_every_ending(
    sqlite_url: str, mock_upstream: ServerThread, capfd: pytest.CaptureFixture[str]
) -> None:
    """Through a real server: an ok, a 429, an upstream error and a client that leaves
    mid-stream each write exactly one access line, with its outcome, cost and request id."""
    settings = make_settings(sqlite_url, mock_upstream.url, log_format="json")
    server = ServerThread(create_app(settings, run_scheduler=False, migrate=False)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/admin/keys", json={"max_budget": 0.1}, headers=bearer(ADMIN_KEY))
            key = r.json()["key"]
            capfd.readouterr()
            ids = {}
            r = client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            ids["ok"] = r.headers["x-request-id"]
            big = {**CHAT, "max_tokens": 1_000}
            r = client.post("/v1/chat/completions", json=big, headers=bearer(key))
            assert r.status_code == 429
            ids["rejected"] = r.headers["x-request-id"]
            failing = {**bearer(key), "x-mock-status": "500"}
            r = client.post("/v1/chat/completions", json=CHAT, headers=failing)
            assert r.status_code == 500
            ids["upstream_error"] = r.headers["x-request-id"]
            slow = {**bearer(key), "x-mock-delay-ms": "300"}
            streamed = {**CHAT, "max_tokens": 20, "stream": True}
            with httpx.Client(base_url=server.url, timeout=30) as leaving:
                with leaving.stream(
                    "POST", "/v1/chat/completions", json=streamed, headers=slow
                ) as r:
                    ids["client_disconnect"] = r.headers["x-request-id"]
                    next(r.iter_raw())
            deadline = time.monotonic() + 5
            lines: list[dict[str, Any]] = []
            text = ""
            while time.monotonic() < deadline:
                text += capfd.readouterr().err
                lines = [e for e in json_lines(text) if e.get("logger") == "budgetgate.access"]
                if len(lines) >= 4:
                    break
                time.sleep(0.05)
    finally:
        server.stop()
    assert len(lines) == 4, text
    by_id = {e["request_id"]: e for e in lines}
    for outcome, request_id in ids.items():
        line = by_id[request_id]
        assert line["outcome"] == outcome, line
        assert line["key_id"] is not None
    assert by_id[ids["ok"]]["cost"] == 0.005
    assert by_id[ids["rejected"]]["cost"] is None
    assert by_id[ids["upstream_error"]]["upstream_status"] == 500
    assert by_id[ids["upstream_error"]]["cost"] == 0
    assert 0 < by_id[ids["client_disconnect"]]["cost"] <= 0.02
    assert key not in text and UPSTREAM_KEY not in text and ADMIN_KEY not in text


async def test_label_sets_stay_bounded(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    """A thousand random paths and model names add a handful of label sets, not a thousand."""
    settings = make_settings(database_url, mock_upstream.url, unpriced_model="free")
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(max_budget=100)
        before = (await gw.client.get("/metrics")).text
        for i in range(1000):
            if i % 2:
                r = await gw.client.post(f"/v1/rand-{i}/x", json={}, headers=bearer(key["key"]))
            else:
                body = {**CHAT, "model": f"random-model-{i}"}
                r = await gw.client.post(
                    "/v1/chat/completions", json=body, headers=bearer(key["key"])
                )
            assert r.status_code in (200, 404), r.text
        after = (await gw.client.get("/metrics")).text

    def series(page: str) -> set[str]:
        return {line.split(" ")[0] for line in page.splitlines() if line.startswith("budgetgate_")}

    added = series(after) - series(before)
    assert len(added) < 50, sorted(added)
    assert "random-model" not in after and "rand-" not in after


async def test_per_budget_gauges_are_opt_in(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    for enabled in (False, True):
        settings = make_settings(database_url, mock_upstream.url, metrics_budget_gauges=enabled)
        async with running_gateway(settings, clock) as gw:
            key = await gw.create_key(
                alias=f"team-{enabled}",
                max_budget=1,
                budget_duration="1mo",
                budgets=[{"max_budget": 0.5, "budget_duration": "1d"}],
            )
            r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=bearer(key["key"]))
            assert r.status_code == 200
            page = (await gw.client.get("/metrics")).text
            if not enabled:
                assert "budgetgate_budget_spend_dollars{" not in page
                continue
            labels = {"key_id": key["id"], "alias": "team-True"}
            assert sample(page, "budgetgate_budget_spend_dollars", window="1mo", **labels) == 0.005
            assert sample(
                page, "budgetgate_budget_remaining_dollars", window="1mo", **labels
            ) == pytest.approx(0.995)
            assert sample(
                page, "budgetgate_budget_remaining_dollars", window="1d", **labels
            ) == pytest.approx(0.495)
            await gw.admin("DELETE", f"/admin/keys/{key['id']}")
            page = (await gw.client.get("/metrics")).text
            assert key["id"] not in page  # a revoked key's series are gone

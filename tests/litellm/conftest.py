"""Fixtures for the tests against a real LiteLLM proxy (`make test-litellm`).

LiteLLM (`litellm[proxy]`, installed by scripts/litellm-venv.sh in .litellm-venv, never in the
project's .venv) runs as a subprocess without a database, with a master key and one model,
`gpt-4o-mini`, routed to the project's mock upstream. budgetgate runs in managed mode as a real
uvicorn server in front of it, on a fresh migrated SQLite ledger per test.

BUDGETGATE_LITELLM_BIN names the `litellm` executable. Unset: every test here is skipped (plain
`make test` does not need LiteLLM). Set: a missing or broken LiteLLM fails the tests.
BUDGETGATE_LITELLM_START_TIMEOUT (seconds, default 300) bounds LiteLLM's start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.clock import SystemClock
from app.config import Settings
from app.main import create_app
from app.migrate import upgrade_to_head
from tests.litellm.offline import LITELLM_OFFLINE_ENV, LITELLM_SCRUBBED_ENV
from tests.servers import ServerThread, free_port

LITELLM_BIN_ENV = "BUDGETGATE_LITELLM_BIN"
START_TIMEOUT_ENV = "BUDGETGATE_LITELLM_START_TIMEOUT"
MASTER_KEY = "sk-litellm-master-0123456789abcdef"
ADMIN_KEY = "litellm-it-admin-key-0123456789"
MODEL = "gpt-4o-mini"


_timings: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if "litellm_start" in _timings:
        terminalreporter.write_line(
            f"LiteLLM proxy ready in {_timings['litellm_start']:.1f}s "
            f"(GET /health/liveliness answered)"
        )


@pytest.fixture(scope="session", autouse=True)
def litellm_bin() -> Path:
    value = os.environ.get(LITELLM_BIN_ENV)
    if not value:
        pytest.skip(
            f"{LITELLM_BIN_ENV} is not set: the LiteLLM integration tests need a LiteLLM "
            "install; run `make test-litellm` (installs it in .litellm-venv and sets it)"
        )
    path = Path(value).expanduser().absolute()
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{LITELLM_BIN_ENV}={value}: no executable there (run scripts/litellm-venv.sh)")
    return path


@dataclass
class LiteLLM:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop LiteLLM and whatever it started: it leads its own process group."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def litellm(
    litellm_bin: Path, mock_upstream: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiteLLM]:
    workdir = tmp_path_factory.mktemp("litellm")
    config = workdir / "config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {mock_upstream.url}/v1\n"
        "      api_key: fake\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in LITELLM_SCRUBBED_ENV}
    env.update(LITELLM_OFFLINE_ENV)
    port = free_port()
    log_path = workdir / "litellm.log"
    cmd = [str(litellm_bin), "--config", str(config), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--num_workers", "1"]
    started = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = LiteLLM(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        _wait_ready(server, float(os.environ.get(START_TIMEOUT_ENV, "300")))
        _timings["litellm_start"] = time.monotonic() - started
        yield server
    finally:
        _stop(proc)


def _wait_ready(server: LiteLLM, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = server.process.poll()
        if code is not None:
            pytest.fail(
                f"LiteLLM exited with code {code} before it was ready; its log:\n"
                + server.log_tail()
            )
        try:
            if httpx.get(f"{server.url}/health/liveliness", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"LiteLLM did not answer GET /health/liveliness within {timeout:.0f}s "
                f"({START_TIMEOUT_ENV} to change); its log:\n" + server.log_tail()
            )
        time.sleep(0.25)


class BudgetGate:
    """budgetgate (managed mode, SQLite ledger) as a real uvicorn server in front of LiteLLM."""

    def __init__(self, server: ServerThread, admin: httpx.Client) -> None:
        self.server = server
        self.url = server.url
        self.admin = admin

    def create_key(self, **body: Any) -> dict[str, Any]:
        r = self.admin.post("/admin/keys", json=body)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def key(self, key_id: str) -> dict[str, Any]:
        r = self.admin.get(f"/admin/keys/{key_id}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def ledger(self, key_id: str) -> list[dict[str, Any]]:
        r = self.admin.get("/admin/ledger", params={"key_id": key_id})
        assert r.status_code == 200, r.text
        return r.json()["data"]  # type: ignore[no-any-return]

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def budgetgate(litellm: LiteLLM, tmp_path: Path) -> Iterator[BudgetGate]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    upgrade_to_head(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=url,
        upstream_url=litellm.url,
        upstream_api_key=MASTER_KEY,
        admin_key=ADMIN_KEY,
        key_mode="managed",
        prices_file=None,  # gpt-4o-mini is priced by genai-prices
        trust_upstream_cost=True,
        log_format="text",
        log_level="warning",
    )
    app = create_app(settings, SystemClock(), run_scheduler=False, migrate=False)
    server = ServerThread(app).start()
    admin = httpx.Client(
        base_url=server.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    )
    try:
        yield BudgetGate(server, admin)
    finally:
        admin.close()
        server.stop()


def nanos(dollars: float | str | Decimal) -> Decimal:
    """Dollars (a JSON number from the admin API, or a header) as nano-dollars, exactly."""
    return Decimal(str(dollars)).scaleb(9)

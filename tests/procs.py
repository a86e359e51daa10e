"""Real processes for the process-level tests: the mock upstream and gateway replicas.

Everything here runs the console script exactly as a deployment would
(``budgetgate mock-upstream`` / ``migrate`` / ``serve`` / ``reconcile``), each in its own
session (process group) with its stdout and stderr captured to files, so tests can kill
(SIGKILL), terminate (SIGTERM) and restart them, and assert on their logs.

Usage::

    with Fleet(tmp_path, database_url, replicas=3) as fleet:   # mock + migrate + 3 gateways
        fleet.gateways[0].url                                  # http://127.0.0.1:PORT
        fleet.gateways[1].kill()                               # SIGKILL
        fleet.gateways[1].start(env={"BUDGETGATE_RESERVATION_TTL_SECONDS": "2"})
        assert fleet.reconcile().returncode == 0

Only processes started here are ever signalled, by their own process-group id. ``close()``
(also on failure, via the context manager / fixtures) stops them all; an ``atexit`` hook
kills whatever a crashed test run left behind.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "stress-admin-key-5f0c7a1e2d9b"
UPSTREAM_KEY = "sk-upstream-stress-credential-8d41c2e7"
PRICES = str(ROOT / "tests" / "data" / "prices.yaml")

# Every log file and every secret any harness created in this interpreter: the secrets
# scenario scans all of them at the end of the run.
LOG_FILES: list[Path] = []
SECRETS: set[str] = {ADMIN_KEY, UPSTREAM_KEY}

_LIVE: set[ManagedProcess] = set()


def budgetgate_bin() -> str:
    """The console script of the interpreter running the tests (the project's .venv)."""
    for candidate in (Path(sys.executable).parent / "budgetgate", ROOT / ".venv/bin/budgetgate"):
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("the `budgetgate` console script is not installed (make venv)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env() -> dict[str, str]:
    """The test process's environment without settings or libpq variables that could leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUDGETGATE_", "PG")) or k == "BUDGETGATE_PG_BINDIR"
    }
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """One OS process: started in its own session, output to files, health-checked."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        workdir: Path,
        port: int,
        health_path: str = "/healthz",
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.workdir = workdir
        self.port = port
        self.health_path = health_path
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        LOG_FILES.extend([self.stderr_path, self.stdout_path])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self, env: Mapping[str, str] | None = None) -> None:
        """Start the process (not waiting for it to be healthy). `env` overrides settings for
        this and later starts."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        if env:
            self.env.update(env)
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
            marker = f"--- harness: start #{self.starts} of {self.name} on :{self.port} ---\n"
            err.write(marker.encode())
            err.flush()
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.workdir,  # no stray .env is picked up
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        _LIVE.add(self)

    def wait_healthy(self, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while True:
                if not self.alive:
                    code = self.popen.returncode if self.popen else None
                    raise RuntimeError(
                        f"{self.name} exited (code {code}) before it was healthy; "
                        f"stderr tail:\n{tail(self.stderr_path)}"
                    )
                try:
                    if client.get(self.url + self.health_path).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} not healthy after {timeout}s; stderr tail:\n"
                        f"{tail(self.stderr_path)}"
                    )
                time.sleep(0.05)

    def start(self, env: Mapping[str, str] | None = None, timeout: float = 45) -> None:
        self.spawn(env)
        self.wait_healthy(timeout)

    def _signal(self, sig: signal.Signals) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, sig)  # our own session: the process and any children
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup of any kind."""
        self._signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=15)
        _LIVE.discard(self)

    def terminate(self, timeout: float = 15) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL if it does not exit within `timeout`."""
        if self.popen is None:
            return None
        self._signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _LIVE.discard(self)
        return self.popen.returncode

    def restart(
        self, env: Mapping[str, str] | None = None, *, kill: bool = False, timeout: float = 45
    ) -> None:
        self.kill() if kill else self.terminate()
        self.start(env, timeout)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"<{self.name} pid={self.pid} port={self.port} alive={self.alive}>"


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        try:
            proc.kill()
        except Exception:  # best effort at exit
            pass


class Fleet:
    """The mock upstream plus N gateway replicas on one ledger database."""

    def __init__(
        self,
        workdir: Path,
        database_url: str,
        replicas: int = 3,
        env: Mapping[str, str] | None = None,
        replica_env: Mapping[int, Mapping[str, str]] | None = None,
    ) -> None:
        """`env`: settings for every replica (over the harness defaults); `replica_env`: extra
        settings for some replicas, by index."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.database_url = database_url
        self.bin = budgetgate_bin()
        self.mock = ManagedProcess(
            "mock-upstream",
            [self.bin, "mock-upstream", "--port", str(port := free_port())],
            base_env(),
            self.workdir,
            port,
            health_path="/mock/stats",
        )
        self.settings: dict[str, str] = {
            "BUDGETGATE_DATABASE_URL": database_url,
            "BUDGETGATE_UPSTREAM_URL": self.mock.url,
            "BUDGETGATE_ADMIN_KEY": ADMIN_KEY,
            "BUDGETGATE_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "BUDGETGATE_PRICES_FILE": PRICES,
            "BUDGETGATE_RESET_INTERVAL_SECONDS": "1",
            "BUDGETGATE_RESERVATION_TTL_SECONDS": "60",
            "BUDGETGATE_LOG_FORMAT": "json",
            "BUDGETGATE_LOG_LEVEL": "info",
            "BUDGETGATE_UPSTREAM_TIMEOUT_SECONDS": "30",
        }
        self.settings.update(env or {})
        self.gateways: list[ManagedProcess] = []
        for i in range(replicas):
            port = free_port()
            self.gateways.append(
                ManagedProcess(
                    f"gateway-{i}",
                    [self.bin, "serve", "--host", "127.0.0.1", "--port", str(port)],
                    self.env(**(replica_env or {}).get(i, {})),
                    self.workdir,
                    port,
                )
            )

    # -- lifecycle ---------------------------------------------------------------------------

    def env(self, **overrides: str) -> dict[str, str]:
        return base_env() | self.settings | overrides

    def start(self, timeout: float = 60) -> Fleet:
        try:
            self.mock.spawn()
            self.migrate()  # once, before any replica: `serve` refuses an outdated schema
            for gw in self.gateways:
                gw.spawn()
            procs = self.processes()
            with ThreadPoolExecutor(len(procs)) as pool:
                for f in [pool.submit(p.wait_healthy, timeout) for p in procs]:
                    f.result()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for gw in self.gateways:
            gw.kill()
        self.mock.kill()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def urls(self) -> list[str]:
        return [gw.url for gw in self.gateways]

    def processes(self) -> list[ManagedProcess]:
        return [self.mock, *self.gateways]

    # -- the CLI, as a deployment runs it ----------------------------------------------------

    def cli(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin, *args],
            env=self.env(**env),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def migrate(self) -> None:
        proc = self.cli("migrate")
        if proc.returncode != 0:
            raise RuntimeError(f"budgetgate migrate failed:\n{proc.stdout}\n{proc.stderr}")

    def reconcile(self) -> subprocess.CompletedProcess[str]:
        return self.cli("reconcile")

    # -- HTTP helpers ------------------------------------------------------------------------

    @staticmethod
    def admin_headers() -> dict[str, str]:
        return {"authorization": f"Bearer {ADMIN_KEY}"}

    async def admin(
        self, client: httpx.AsyncClient, method: str, path: str, replica: int = 0, **kw: Any
    ) -> httpx.Response:
        return await client.request(
            method, self.gateways[replica].url + path, headers=self.admin_headers(), **kw
        )

    async def create_key(
        self, client: httpx.AsyncClient, replica: int = 0, **body: Any
    ) -> dict[str, Any]:
        r = await self.admin(client, "POST", "/admin/keys", replica, json=body)
        if r.status_code != 201:
            raise AssertionError(f"create key: {r.status_code} {r.text}")
        data: dict[str, Any] = r.json()
        SECRETS.add(data["key"])
        return data

    async def mock_requests(self, client: httpx.AsyncClient) -> int:
        r = await client.get(self.mock.url + "/mock/stats")
        r.raise_for_status()
        return int(r.json()["requests"])

    async def mock_reset(self, client: httpx.AsyncClient) -> None:
        (await client.post(self.mock.url + "/mock/reset")).raise_for_status()


def chat_body(max_tokens: int = 10, model: str = "bg-test", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": max_tokens,
        **extra,
    }


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", **headers}

"""The servers a benchmark runs, and what is measured of them through /proc.

Processes come from the tests' own helpers (tests/procs.py: each server in its own session,
output to files, health-checked; tests/pgcluster.py: a throwaway PostgreSQL cluster): the
benchmark starts servers exactly as the process-level tests do.

`Rig` starts the mock upstream, the bare baseline proxy, gateways on SQLite and PostgreSQL
(durable, or with fsync-free ledgers) and, optionally, the LiteLLM proxy, creates their keys,
and stops everything again; `bench/run.py` and `bench/soak.py` drive what it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the tests' process helpers

from tests.litellm.offline import LITELLM_OFFLINE_ENV, LITELLM_SCRUBBED_ENV  # noqa: E402
from tests.pgcluster import PgCluster, find_pg_bindir  # noqa: E402
from tests.procs import ManagedProcess, budgetgate_bin, free_port, tail  # noqa: E402

MODEL = "bg-bench"
ADMIN_KEY = "bench-admin-key-0123456789"
MAX_BUDGET = 100_000_000  # dollars: never the limit
MAX_TOKENS = 16

# The LiteLLM proxy row (optional), run as the LiteLLM integration tests run it.
LITELLM_BIN_ENV = "BUDGETGATE_LITELLM_BIN"
LITELLM_START_TIMEOUT_ENV = "BUDGETGATE_LITELLM_START_TIMEOUT"
LITELLM_DEFAULT_BIN = ROOT / ".litellm-venv" / "bin" / "litellm"
LITELLM_MASTER_KEY = "sk-litellm-bench-master-0123456789abcdef"
LITELLM_HOWTO = (
    "run `make test-litellm` once (or `bash scripts/litellm-venv.sh`) to install it in "
    ".litellm-venv, or point BUDGETGATE_LITELLM_BIN / --litellm at a `litellm` executable"
)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ----------------------------------------------------------------------------- processes


class BenchProcess(ManagedProcess):
    """A server of the benchmark (tests/procs.py's ManagedProcess). With `group`, its CPU and
    RSS are summed over its process group, and stopping it waits for every member: LiteLLM and
    `--workers N` servers start children that may outlive the leader."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        workdir: Path,
        port: int,
        health_path: str,
        group: bool = False,
    ) -> None:
        super().__init__(name, argv, env, workdir, port, health_path)
        self.group = group

    def log_tail(self, n: int = 30) -> str:
        return tail(self.stderr_path, n) + "\n" + tail(self.stdout_path, n)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (in-flight requests finish), SIGKILL after `timeout`; for a group, also
        whatever of it outlives the leader."""
        if self.popen is None:
            return
        self.terminate(timeout)
        if not self.group:
            return
        deadline = time.monotonic() + 5
        while group_pids(self.popen.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def rss_of(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(rest.split()[0]) / 1024  # kB -> MiB
    except OSError:
        pass
    return out


_CLK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 'state' (field 3) on


def rss_of_proc(proc: BenchProcess) -> dict[str, float]:
    """rss_of the process; for a process group (LiteLLM) summed over its live members."""
    if not proc.group:
        return rss_of(proc.pid)
    out: dict[str, float] = {}
    for pid in group_pids(proc.pid) or [proc.pid]:
        for k, v in rss_of(pid).items():
            out[k] = out.get(k, 0.0) + v
    return out


def cpu_seconds(pid: int, children: bool = False) -> float:
    """user+system CPU of a process (all its threads); with `children`, plus what its exited
    children used (for the postmaster: backends that came and went)."""
    f = _stat_fields(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12])  # utime, stime (fields 14, 15)
    if children:
        ticks += int(f[13]) + int(f[14])  # cutime, cstime
    return ticks / _CLK


def cluster_cpu_seconds(postmaster: int) -> float:
    """CPU of a PostgreSQL cluster: the postmaster, its live children, its exited children."""
    total = cpu_seconds(postmaster, children=True)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and int(f[1]) == postmaster:
                total += cpu_seconds(int(entry))
    return total


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f is not None and int(f[2]) == pgid and f[0] != "Z":  # state, pgrp
                out.append(int(entry))
    return out


def group_cpu_seconds(pgid: int) -> float:
    """CPU of a process group: the leader with its exited children, plus its live members."""
    total = cpu_seconds(pgid, children=True)
    for pid in group_pids(pgid):
        if pid != pgid:
            total += cpu_seconds(pid)
    return total


def task_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread id of a process."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        out[tid] = (int(fields[11]) + int(fields[12])) / _CLK
    return out


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- tools


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str  # baseline | sqlite | pg
    label: str
    url: str
    keys: list[str]  # API keys the load generators take turns with, request by request
    proc: BenchProcess
    env: dict[str, str] | None = None  # the gateway's env (for reconcile)
    postmaster: int | None = None  # its PostgreSQL cluster (CPU accounting)
    # Its own request bodies (None: the rig's): the scoped rows name an end user.
    json_body: Path | None = None
    stream_body: Path | None = None

    @property
    def key(self) -> str:
        return self.keys[0] if self.keys else ""

    @property
    def gateway(self) -> bool:
        return self.name.startswith(("sqlite", "pg"))

    def cpu(self) -> tuple[float, float]:
        """(server process CPU s, database server CPU s)."""
        db = cluster_cpu_seconds(self.postmaster) if self.postmaster else 0.0
        own = group_cpu_seconds(self.proc.pid) if self.proc.group else cpu_seconds(self.proc.pid)
        return own, db


@dataclass
class Rig:
    """The servers of one benchmark run, in a temp dir; `cleanup()` stops all of them."""

    tmp: Path
    workers: int = 1  # worker processes per server (baseline, gateways, LiteLLM alike)
    keys: int = 1  # API keys per gateway
    keep: bool = False  # keep the /dev/shm ledger dir (the temp dir is the caller's)
    procs: list[BenchProcess] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    cluster: PgCluster | None = None
    shm_dir: Path | None = None
    json_body: Path | None = None
    stream_body: Path | None = None
    litellm_note: str | None = None  # why there is no LiteLLM row (None: there is one)
    upstream: str = ""  # the mock upstream's URL

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        port: int,
        health_path: str,
        group: bool = False,
        timeout: float = 60,
    ) -> BenchProcess:
        proc = BenchProcess(name, argv, env, self.tmp, port, health_path, group=group)
        self.procs.append(proc)
        proc.start(timeout=timeout)
        return proc

    def write_inputs(self) -> None:
        prices = self.tmp / "prices.yaml"
        prices.write_text(
            f"models:\n  {MODEL}:\n    input_per_million: 1\n    output_per_million: 1\n"
        )
        messages = [{"role": "user", "content": "Say hello to the benchmark, briefly please."}]
        body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS}
        self.json_body = self.tmp / "body.json"
        self.json_body.write_text(json.dumps(body))
        self.stream_body = self.tmp / "body-stream.json"
        self.stream_body.write_text(json.dumps(body | {"stream": True}))

    def gateway_env(self, database_url: str) -> dict[str, str]:
        env = self.base_env()
        env.update(
            BUDGETGATE_DATABASE_URL=database_url,
            BUDGETGATE_UPSTREAM_URL=self.upstream,
            BUDGETGATE_ADMIN_KEY=ADMIN_KEY,
            BUDGETGATE_PRICES_FILE=str(self.tmp / "prices.yaml"),
        )
        return env

    # -- the servers ---------------------------------------------------------------------

    def start_mock_upstream(self) -> str:
        port = free_port()
        self.upstream = f"http://127.0.0.1:{port}"
        say(f"bench: mock upstream on :{port}")
        argv = [budgetgate_bin(), "mock-upstream", "--port", str(port)]
        self.start("mock-upstream", argv, self.base_env(), port, "/v1/models")
        return self.upstream

    def start_baseline(self) -> Target:
        port = free_port()
        say(f"bench: baseline proxy on :{port}")
        argv = [
            sys.executable, str(BENCH / "baseline_proxy.py"), "--port", str(port),
            "--upstream", self.upstream, "--workers", str(self.workers),
        ]  # fmt: skip
        proc = self.start(
            "baseline", argv, self.base_env(), port, "/v1/models", group=self.workers > 1
        )
        target = Target("baseline", "baseline", f"http://127.0.0.1:{port}", [], proc)
        self.targets.append(target)
        return target

    def start_gateway(self, name: str, label: str, env: dict[str, str]) -> Target:
        port = free_port()
        argv = [budgetgate_bin(), "serve", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--workers", str(self.workers)]
        url = f"http://127.0.0.1:{port}"
        proc = self.start(name, argv, env, port, "/healthz", group=self.workers > 1)
        keys = []
        for i in range(self.keys):
            status, out = http(
                "POST",
                url + "/admin/keys",
                {"alias": f"bench-{name}-{i}", "max_budget": MAX_BUDGET},
                {"authorization": f"Bearer {ADMIN_KEY}"},
            )
            if status != 201:
                raise RuntimeError(f"{name}: creating a bench key failed: {status} {out[:500]!r}")
            keys.append(json.loads(out)["key"])
        return Target(name, label, url, keys, proc, env)

    def add_scoped_target(self, gateway: Target) -> Target:
        """The same gateway, driven with a key whose every request is held by five budgets (SPEC
        11): the key's own, a window of the key narrowed to the model, its team's, its user's and
        its end user's (named in the body, created on first sight from the team's template)."""
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        ids = {}
        for kind, body in (
            ("teams", {"alias": f"bench-team-{gateway.name}", "max_budget": MAX_BUDGET,
                       "end_user_budget": [{"max_budget": MAX_BUDGET}]}),
            ("users", {"alias": f"bench-user-{gateway.name}", "max_budget": MAX_BUDGET}),
        ):  # fmt: skip
            status, out = http("POST", f"{gateway.url}/admin/{kind}", body, admin)
            if status != 201:
                raise RuntimeError(f"{gateway.name}: creating bench {kind}: {status} {out[:300]!r}")
            ids[kind] = json.loads(out)["id"]
        key_body = {
            "alias": f"bench-{gateway.name}-scoped",
            "max_budget": MAX_BUDGET,
            "team_id": ids["teams"],
            "user_id": ids["users"],
            "model_budgets": [{"models": [MODEL], "max_budget": MAX_BUDGET}],
        }
        status, out = http("POST", f"{gateway.url}/admin/keys", key_body, admin)
        if status != 201:
            raise RuntimeError(f"{gateway.name}: creating the scoped key: {status} {out[:300]!r}")
        assert self.json_body is not None and self.stream_body is not None
        bodies = []
        for path in (self.json_body, self.stream_body):
            scoped = path.with_name(f"scoped-{path.name}")
            scoped.write_text(json.dumps(json.loads(path.read_text()) | {"user": "bench-user"}))
            bodies.append(scoped)
        target = Target(
            f"{gateway.name}-5",
            f"{gateway.label} 5 budgets",
            gateway.url,
            [json.loads(out)["key"]],
            gateway.proc,
            gateway.env,
            gateway.postmaster,
            *bodies,
        )
        self.targets.append(target)
        return target

    def start_sqlite_gateway(self, kind: str) -> Target | None:
        """kind `durable`: the ledger file in the temp dir; `fast`: on /dev/shm (tmpfs)."""
        if kind == "durable":
            db = self.tmp / "ledger.db"
            name, label = "sqlite", "gw/sqlite"
        else:
            shm = Path("/dev/shm")
            if not (shm.is_dir() and os.access(shm, os.W_OK)):
                say("bench: /dev/shm not writable: the gw/sqlite-shm rows are skipped")
                return None
            self.shm_dir = Path(tempfile.mkdtemp(prefix="bg-bench-", dir=shm))
            db = self.shm_dir / "ledger.db"
            name, label = "sqlite-shm", "gw/sqlite-shm"
        say(f"bench: gateway on SQLite ({db})")
        target = self.start_gateway(name, label, self.gateway_env(f"sqlite+aiosqlite:///{db}"))
        self.targets.append(target)
        return target

    def start_pg_cluster(self) -> PgCluster | None:
        """A throwaway PostgreSQL cluster, durable (fsync, synchronous_commit and
        full_page_writes on, as a ledger runs); None without server binaries."""
        if self.cluster is not None:
            return self.cluster
        if find_pg_bindir() is None:
            say("bench: no PostgreSQL server binaries found: the gw/pg rows are skipped")
            return None
        say("bench: starting a throwaway PostgreSQL cluster ...")
        self.cluster = PgCluster()
        self.cluster.start()
        # The test cluster runs with fsync/synchronous_commit/full_page_writes off; a ledger is
        # not run like that.
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            self.cluster.psql(f"ALTER SYSTEM SET {setting} = on")
        self.cluster.psql("SELECT pg_reload_conf()")
        return self.cluster

    def start_pg_gateway(self, kind: str) -> Target | None:
        """kind `durable`: a database with synchronous_commit=on; `fast`: =off."""
        cluster = self.start_pg_cluster()
        if cluster is None:
            return None
        dbname = "budgetgate_bench" if kind == "durable" else "budgetgate_bench_async"
        db_url = cluster.create_database(dbname)
        if kind == "fast":
            # Commits do not wait for their WAL flush (a crash may lose the last few
            # hundred ms of commits, never consistency).
            cluster.psql(f"ALTER DATABASE {dbname} SET synchronous_commit = off")
        env = self.gateway_env(db_url)
        subprocess.run(
            [budgetgate_bin(), "migrate"], env=env, cwd=self.tmp, check=True,
            capture_output=True, timeout=120,
        )  # fmt: skip
        name, label = ("pg", "gw/pg") if kind == "durable" else ("pg-async", "gw/pg-async")
        say(f"bench: gateway on PostgreSQL ({dbname}, port {cluster.port})")
        target = self.start_gateway(name, label, env)
        pid_file = Path(cluster.data_dir) / "postmaster.pid"
        try:
            target.postmaster = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        self.targets.append(target)
        return target

    def start_litellm(self, path: Path | None, why: str) -> None:
        """The LiteLLM proxy (no database, a master key) with one model, `bg-bench`, routed to
        the mock upstream: a target like the others, authenticated with the master key.
        Optional: when it is missing (`path` None, `why` says why) or does not start, the row
        is left out (with a note)."""
        if path is None:
            self.litellm_note = why
            say(f"bench: no LiteLLM row: {why}")
            return
        config = self.tmp / "litellm-config.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL}\n"
            f"      api_base: {self.upstream}/v1\n"
            "      api_key: fake\n"
            "general_settings:\n"
            f"  master_key: {LITELLM_MASTER_KEY}\n"
        )
        env = {k: v for k, v in self.base_env().items() if k not in LITELLM_SCRUBBED_ENV}
        env.update(LITELLM_OFFLINE_ENV)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [str(path), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--num_workers", str(self.workers)]
        timeout = float(os.environ.get(LITELLM_START_TIMEOUT_ENV, "300"))
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        say(f"bench: LiteLLM proxy on :{port} ({path}; {workers}, no database) ...")
        started = time.monotonic()
        try:
            proc = self.start(
                "litellm", argv, env, port, "/health/liveliness", group=True, timeout=timeout
            )
        except RuntimeError as exc:
            failed = self.procs.pop()
            failed.stop()
            self.litellm_note = f"LiteLLM did not start ({path}): {exc}"
            say(f"bench: no LiteLLM row: {self.litellm_note}")
            return
        say(f"bench: LiteLLM ready in {time.monotonic() - started:.1f}s")
        self.targets.append(Target("litellm", "litellm", url, [LITELLM_MASTER_KEY], proc))

    def smoke(self) -> None:
        """One request of each kind per target: a broken setup fails here, not as a table of
        errors."""
        for t in self.targets:
            headers = {"authorization": f"Bearer {t.key}"} if t.key else {}
            for body in (self.json_body, self.stream_body):
                assert body is not None
                status, out = http(
                    "POST",
                    t.url + "/v1/chat/completions",
                    json.loads(body.read_text()),
                    headers,
                )
                if status != 200:
                    raise RuntimeError(f"{t.label}: smoke request failed: {status} {out[:500]!r}")

    # -- teardown ------------------------------------------------------------------------

    def stop_gateways(self) -> None:
        """Graceful stop: in-flight requests settle (before reconcile)."""
        for p in self.procs:
            if p.name.startswith(("sqlite", "pg")):
                p.stop()

    def reconcile(self, t: Target) -> dict[str, Any]:
        assert t.env is not None
        proc = subprocess.run(
            [budgetgate_bin(), "reconcile", "--json"],
            env=t.env,
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            data = {"ok": False, "problems": [proc.stdout + proc.stderr]}
        data["exit"] = proc.returncode
        return data

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop()
            except Exception as exc:  # best effort
                say(f"bench: stopping {p.name}: {exc}")
        if self.cluster is not None:
            try:
                self.cluster.cleanup()
            except Exception as exc:
                say(f"bench: PostgreSQL cleanup: {exc}")
        if self.shm_dir is not None and not self.keep:
            shutil.rmtree(self.shm_dir, ignore_errors=True)


def litellm_bin(flag: str | None, disabled: bool) -> tuple[Path | None, str]:
    """(the `litellm` executable, or None with why not): `flag` (--litellm), else
    $BUDGETGATE_LITELLM_BIN, else .litellm-venv's."""
    if disabled:
        return None, "skipped (--no-litellm)"
    value = flag or os.environ.get(LITELLM_BIN_ENV)
    if value:
        path = Path(value).expanduser().absolute()
        origin = "--litellm" if flag else LITELLM_BIN_ENV
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        return None, f"{origin}={value}: no executable there; {LITELLM_HOWTO}"
    if LITELLM_DEFAULT_BIN.is_file() and os.access(LITELLM_DEFAULT_BIN, os.X_OK):
        return LITELLM_DEFAULT_BIN, ""
    return None, f"LiteLLM is not installed; for this row {LITELLM_HOWTO}"

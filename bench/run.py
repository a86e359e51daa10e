#!/usr/bin/env python3
"""`make bench`: what the gateway costs over a bare pass-through proxy.

Starts, each as its own process:

* the project's mock upstream (`budgetgate mock-upstream`);
* the baseline: bench/baseline_proxy.py, a bare uvicorn + Starlette + aiohttp pass-through
  (no auth, no ledger; same uvicorn and gc settings as the gateway) -- the floor;
* the gateway on SQLite (`budgetgate serve`, a fresh ledger file in a temp dir);
* the gateway on PostgreSQL, when server binaries exist (a throwaway PgCluster from
  tests/pgcluster.py; `budgetgate migrate`, then `budgetgate serve`);
* optionally the LiteLLM proxy (`litellm[proxy]`, 1 worker, no database, offline settings), when
  an install exists (.litellm-venv from scripts/litellm-venv.sh, BUDGETGATE_LITELLM_BIN or
  --litellm PATH), in front of the same mock upstream -- the comparison the issue asks for;

creates a key with a huge budget through the admin API, then drives each target, alternating
targets run by run so that machine noise hits all of them alike:

* non-streaming: wrk (1 thread, bench/post.lua, --latency) at 1 and 32 connections;
* streaming: bench/stream_client.py (its own process) at 1 and 32 concurrent requests,
  measuring time to first byte (TTFB) and to last byte.

Prints one table (requests/s, p50/p99, errors, ratios to the baseline), the targets of the
performance issue (reported, never asserted), each process's RSS after the runs and the
`budgetgate reconcile` result of each ledger. `--profile` adds a py-spy profile of the gateway
under load. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # tests.pgcluster, tests.litellm.offline: stdlib only

from tests.litellm.offline import LITELLM_OFFLINE_ENV, LITELLM_SCRUBBED_ENV  # noqa: E402

BIN = Path(sys.executable).parent  # the venv's bin: budgetgate, py-spy
MODEL = "bg-bench"
ADMIN_KEY = "bench-admin-key-0123456789"
MAX_BUDGET = 100_000_000  # dollars: never the limit
MAX_TOKENS = 16

# What the performance issue asks for (reported against, not asserted).
TARGET_RPS_SQLITE = 0.6
TARGET_RPS_PG = 0.5
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_TTFB_MS = 1.0
TARGET_RSS_MB = 150.0
TARGET_VS_LITELLM = 25.0  # gateway req/s at 32 conns ≥ 25× LiteLLM's (1 worker each)

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


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def budgetgate_bin() -> str:
    for cand in (BIN / "budgetgate", ROOT / ".venv" / "bin" / "budgetgate"):
        if cand.exists():
            return str(cand)
    found = shutil.which("budgetgate")
    if found:
        return found
    sys.exit("bench: `budgetgate` not found: run `make venv` first")


class Proc:
    """A server subprocess in its own session, output to a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        logdir: Path,
        group: bool = False,
    ):
        self.name = name
        # group: stop the whole process group (the process leads it: start_new_session), for
        # servers that start children of their own (LiteLLM).
        self.group = group
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        if self.group:
            self._stop_group(timeout)
        elif self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()

    def _stop_group(self, timeout: float) -> None:
        """SIGTERM to the process group, SIGKILL to whatever of it is left after `timeout` (also
        children that outlive the leader). The group id is the leader's pid."""
        pgid = self.pid
        deadline = time.monotonic() + timeout
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        while time.monotonic() < deadline:
            self.popen.poll()  # reap the leader
            if not group_pids(pgid):
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


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


def wait_ready(proc: Proc, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} did not come up at {url}:\n{proc.log_tail()}")


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


def rss_of_proc(proc: Proc) -> dict[str, float]:
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


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    say("bench: wrk not found; installing it with `apt-get install -y wrk` ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "wrk"], ["apt-get", "update"]):
        try:
            subprocess.run(cmd, env=env, check=False, capture_output=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if cmd[1] == "update":
            try:
                subprocess.run(
                    ["apt-get", "install", "-y", "wrk"],
                    env=env,
                    check=False,
                    capture_output=True,
                    timeout=300,
                )
            except (OSError, subprocess.TimeoutExpired):
                pass
        found = shutil.which("wrk")
        if found:
            return found
    sys.exit(
        "bench: wrk is required and could not be installed automatically.\n"
        "       Install it yourself (Debian/Ubuntu: `sudo apt-get install -y wrk`; macOS: "
        "`brew install wrk`) and run `make bench` again."
    )


def ensure_py_spy() -> str:
    for cand in (BIN / "py-spy", shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    say("bench: installing py-spy into the venv (pip install py-spy) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    if (BIN / "py-spy").exists():
        return str(BIN / "py-spy")
    sys.exit("bench: --profile needs py-spy and `pip install py-spy` failed")


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {"non2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}"] = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(g) for g in m.groups())
    return res


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str  # baseline | sqlite | pg
    label: str
    url: str
    keys: list[str]  # API keys the load generators take turns with, request by request
    proc: Proc
    env: dict[str, str] | None = None  # the gateway's env (for reconcile)
    postmaster: int | None = None  # its PostgreSQL cluster (CPU accounting)

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
class Bench:
    args: argparse.Namespace
    tmp: Path
    wrk: str
    procs: list[Proc] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    cluster: Any = None
    shm_dir: Path | None = None
    json_body: Path | None = None
    stream_body: Path | None = None
    litellm_note: str | None = None  # why there is no LiteLLM row (None: there is one)

    # -- setup ---------------------------------------------------------------------------

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BUDGETGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        ready_url: str,
        group: bool = False,
        timeout: float = 60,
    ) -> Proc:
        proc = Proc(name, argv, env, self.tmp, self.tmp, group=group)
        self.procs.append(proc)
        wait_ready(proc, ready_url, timeout)
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

    def gateway_env(self, upstream: str, database_url: str) -> dict[str, str]:
        env = self.base_env()
        env.update(
            BUDGETGATE_DATABASE_URL=database_url,
            BUDGETGATE_UPSTREAM_URL=upstream,
            BUDGETGATE_ADMIN_KEY=ADMIN_KEY,
            BUDGETGATE_PRICES_FILE=str(self.tmp / "prices.yaml"),
        )
        return env

    def start_gateway(self, name: str, label: str, env: dict[str, str]) -> Target:
        port = free_port()
        argv = [budgetgate_bin(), "serve", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--workers", str(self.args.workers)]
        url = f"http://127.0.0.1:{port}"
        proc = self.start(name, argv, env, url + "/healthz", group=self.args.workers > 1)
        keys = []
        for i in range(self.args.keys):
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

    def setup(self) -> None:
        self.write_inputs()
        upstream = self.setup_servers()
        self.start_litellm(upstream)

    def litellm_bin(self) -> tuple[Path | None, str]:
        """(the `litellm` executable, or None with why not)."""
        if self.args.no_litellm:
            return None, "skipped (--no-litellm)"
        value = self.args.litellm or os.environ.get(LITELLM_BIN_ENV)
        if value:
            path = Path(value).expanduser().absolute()
            origin = "--litellm" if self.args.litellm else LITELLM_BIN_ENV
            if path.is_file() and os.access(path, os.X_OK):
                return path, ""
            return None, f"{origin}={value}: no executable there; {LITELLM_HOWTO}"
        if LITELLM_DEFAULT_BIN.is_file() and os.access(LITELLM_DEFAULT_BIN, os.X_OK):
            return LITELLM_DEFAULT_BIN, ""
        return None, f"LiteLLM is not installed; for this row {LITELLM_HOWTO}"

    def start_litellm(self, upstream: str) -> None:
        """The LiteLLM proxy (1 worker, no database, a master key) with one model, `bg-bench`,
        routed to the mock upstream: a target like the others, authenticated with the master
        key. Optional: when it is missing or does not start, the row is left out (with a note)."""
        path, why = self.litellm_bin()
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
            f"      api_base: {upstream}/v1\n"
            "      api_key: fake\n"
            "general_settings:\n"
            f"  master_key: {LITELLM_MASTER_KEY}\n"
        )
        env = {k: v for k, v in self.base_env().items() if k not in LITELLM_SCRUBBED_ENV}
        env.update(LITELLM_OFFLINE_ENV)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [str(path), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--num_workers", str(self.args.workers)]
        timeout = float(os.environ.get(LITELLM_START_TIMEOUT_ENV, "300"))
        workers = f"{self.args.workers} worker{'s' if self.args.workers > 1 else ''}"
        say(f"bench: LiteLLM proxy on :{port} ({path}; {workers}, no database) ...")
        started = time.monotonic()
        try:
            proc = self.start(
                "litellm", argv, env, url + "/health/liveliness", group=True, timeout=timeout
            )
        except RuntimeError as exc:
            failed = self.procs.pop()
            failed.stop()
            self.litellm_note = f"LiteLLM did not start ({path}): {exc}"
            say(f"bench: no LiteLLM row: {self.litellm_note}")
            return
        say(f"bench: LiteLLM ready in {time.monotonic() - started:.1f}s")
        self.targets.append(Target("litellm", "litellm", url, [LITELLM_MASTER_KEY], proc))

    def setup_servers(self) -> str:
        """Mock upstream, baseline and gateways; returns the mock upstream's URL."""
        bg = budgetgate_bin()
        mock_port = free_port()
        upstream = f"http://127.0.0.1:{mock_port}"
        say(f"bench: mock upstream on :{mock_port}")
        self.start(
            "mock-upstream",
            [bg, "mock-upstream", "--port", str(mock_port)],
            self.base_env(),
            upstream + "/v1/models",
        )

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        say(f"bench: baseline proxy on :{port}")
        proc = self.start(
            "baseline",
            [
                sys.executable,
                str(BENCH / "baseline_proxy.py"),
                "--port",
                str(port),
                "--upstream",
                upstream,
                "--workers",
                str(self.args.workers),
            ],  # fmt: skip
            self.base_env(),
            url + "/v1/models",
            group=self.args.workers > 1,
        )
        self.targets.append(Target("baseline", "baseline", url, [], proc))

        kinds = ("durable", "fast") if self.args.ledger == "both" else (self.args.ledger,)
        for kind in kinds:
            if kind == "durable":
                db = self.tmp / "ledger.db"
                name, label = "sqlite", "gw/sqlite"
            else:
                shm = Path("/dev/shm")
                if not (shm.is_dir() and os.access(shm, os.W_OK)):
                    say("bench: /dev/shm not writable: the gw/sqlite-shm rows are skipped")
                    continue
                self.shm_dir = Path(tempfile.mkdtemp(prefix="bg-bench-", dir=shm))
                db = self.shm_dir / "ledger.db"
                name, label = "sqlite-shm", "gw/sqlite-shm"
            say(f"bench: gateway on SQLite ({db})")
            env = self.gateway_env(upstream, f"sqlite+aiosqlite:///{db}")
            self.targets.append(self.start_gateway(name, label, env))

        if self.args.no_pg:
            say("bench: PostgreSQL skipped (--no-pg)")
            return upstream
        from tests.pgcluster import PgCluster, find_pg_bindir

        if find_pg_bindir() is None:
            say("bench: no PostgreSQL server binaries found: the gw/pg rows are skipped")
            return upstream
        say("bench: starting a throwaway PostgreSQL cluster ...")
        self.cluster = PgCluster()
        self.cluster.start()
        # The test cluster runs with fsync/synchronous_commit/full_page_writes off; a ledger is
        # not run like that.
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            self.cluster.psql(f"ALTER SYSTEM SET {setting} = on")
        self.cluster.psql("SELECT pg_reload_conf()")
        for kind in kinds:
            dbname = "budgetgate_bench" if kind == "durable" else "budgetgate_bench_async"
            db_url = self.cluster.create_database(dbname)
            if kind == "fast":
                # Commits do not wait for their WAL flush (a crash may lose the last few
                # hundred ms of commits, never consistency).
                self.cluster.psql(f"ALTER DATABASE {dbname} SET synchronous_commit = off")
            env = self.gateway_env(upstream, db_url)
            subprocess.run(
                [bg, "migrate"], env=env, cwd=self.tmp, check=True, capture_output=True,
                timeout=120,
            )  # fmt: skip
            name, label = ("pg", "gw/pg") if kind == "durable" else ("pg-async", "gw/pg-async")
            say(f"bench: gateway on PostgreSQL ({dbname}, port {self.cluster.port})")
            target = self.start_gateway(name, label, env)
            pid_file = Path(self.cluster.data_dir) / "postmaster.pid"
            try:
                target.postmaster = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
            self.targets.append(target)
        return upstream

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

    # -- measuring -----------------------------------------------------------------------

    def run_wrk(self, t: Target, conns: int, duration: float) -> dict[str, Any]:
        assert self.json_body is not None
        env = dict(os.environ, BENCH_BODY_FILE=str(self.json_body), BENCH_KEY=",".join(t.keys))
        argv = [
            self.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "10s", "-s", str(BENCH / "post.lua"), t.url,
        ]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
        return parse_wrk(proc.stdout)

    def run_stream(
        self, t: Target, conc: int, duration: float, warmup: float = 0.0
    ) -> dict[str, Any]:
        assert self.stream_body is not None
        out = self.tmp / "stream-result.json"
        argv = [
            sys.executable, str(BENCH / "stream_client.py"),
            "--url", t.url, "--key", ",".join(t.keys), "--body-file", str(self.stream_body),
            "--concurrency", str(conc), "--duration", str(duration),
            "--warmup", str(warmup), "--out", str(out),
        ]  # fmt: skip
        if self.args.stream_delay_ms:
            argv += ["--delay-ms", str(self.args.stream_delay_ms)]
        subprocess.run(argv, check=True, timeout=duration + warmup + 120)
        return json.loads(out.read_text())

    def warmup(self) -> None:
        secs = 1.0 if self.args.quick else 2.0
        for t in self.targets:
            say(f"bench: warming up {t.label} ...")
            self.run_wrk(t, 32, secs)
            self.run_stream(t, 32, secs)

    def measure(self) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
        cases = [("json", 1), ("json", 32), ("stream", 1), ("stream", 32)]
        results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        n = self.args.rounds * len(cases) * len(self.targets)
        i = 0
        for rnd in range(self.args.rounds):
            for mode, conns in cases:
                for t in self.targets:  # alternate targets within each case
                    i += 1
                    say(
                        f"bench: [{i}/{n}] round {rnd + 1} {mode:6} c={conns:<2} {t.label} "
                        f"({self.args.duration:g}s)"
                    )
                    cpu0 = t.cpu()
                    if mode == "json":
                        r = self.run_wrk(t, conns, self.args.duration)
                    else:
                        r = self.run_stream(t, conns, self.args.duration)
                    cpu1 = t.cpu()
                    r["cpu_s"], r["db_cpu_s"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
                    results.setdefault((t.name, mode, conns), []).append(r)
        return results

    # -- profiling -----------------------------------------------------------------------

    def profile(self) -> dict[str, Any] | None:
        name = self.args.profile_target
        t = next((t for t in self.targets if t.name == name), None)
        if t is None:
            say(f"bench: --profile: no target {name!r}")
            return None
        py_spy = ensure_py_spy()
        secs = max(3, round(self.args.profile_seconds))
        raw = self.tmp / f"profile-{name}.txt"
        say(f"bench: profiling {t.label} with py-spy for {secs}s under wrk -c32 ...")
        argv = [
            py_spy, "record", "--pid", str(t.proc.pid), "--duration", str(secs),
            "--rate", str(self.args.profile_rate), "--format", "raw", "--threads",
            "-o", str(raw),
        ]  # fmt: skip
        tasks0 = task_cpu(t.proc.pid)
        spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        load = self.run_wrk(t, 32, secs + 1)
        _, err = spy.communicate(timeout=secs + 60)
        tasks1 = task_cpu(t.proc.pid)
        if spy.returncode != 0 or not raw.exists():
            say(f"bench: py-spy failed: {err.decode(errors='replace')}")
            return None
        if self.args.profile_keep:
            shutil.copy(raw, Path(self.args.profile_keep))
        out = analyze_profile(raw.read_text(), secs, self.args.profile_rate)
        out["load"] = load
        out["target"] = t.label
        # What each thread really used (py-spy counts a thread blocked in some C waits, or
        # runnable but waiting for a CPU, as busy): CPU seconds over the wrk run.
        out["task_cpu"] = {tid: tasks1[tid] - tasks0.get(tid, 0.0) for tid in tasks1}
        out["wall"] = secs + 1
        return out

    # -- phases ---------------------------------------------------------------------------

    def phases(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Each gateway again, as bench/phases.py (instrumented `budgetgate serve`) on the same
        ledger: per-phase wall times and per-request ledger counters at 1 and 32 conns."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        secs = max(2.0, self.args.phases_seconds)
        for t in self.targets:
            if t.env is None:
                continue
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            say(f"bench: phases of {t.label} (instrumented gateway on :{port}) ...")
            proc = self.start(
                f"phases-{t.name}",
                [
                    sys.executable,
                    str(BENCH / "phases.py"),
                    "--port",
                    str(port),
                    "--out",
                    str(self.tmp / f"phases-{t.name}.json"),
                ],  # fmt: skip
                t.env,
                url + "/healthz",
            )
            probe = Target(t.name, t.label, url, t.keys, proc)
            try:
                for conns in (1, 32):
                    self.run_wrk(probe, conns, 1)  # warm up, then count from zero
                    http("GET", url + "/__phases?reset=1")
                    load = self.run_wrk(probe, conns, secs)
                    status, body = http("GET", url + "/__phases?reset=1")
                    if status != 200:
                        raise RuntimeError(f"phases endpoint: {status} {body[:200]!r}")
                    data = json.loads(body)
                    data["load"] = load
                    out.setdefault(t.name, {})[conns] = data
            finally:
                proc.stop()
                self.procs.remove(proc)
            micro = subprocess.run(
                [
                    sys.executable,
                    str(BENCH / "ledger_micro.py"),
                    "--key",
                    t.key,
                    "--raw",
                    "--iterations",
                    str(self.args.micro_iterations),
                ],  # fmt: skip
                env=t.env,
                cwd=self.tmp,
                capture_output=True,
                text=True,
                timeout=600,
            )
            out.setdefault(t.name, {})[0] = {
                "micro": micro.stdout.strip() or micro.stderr.strip()[-2000:]
            }
        return out

    # -- teardown ------------------------------------------------------------------------

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
        if self.shm_dir is not None and not self.args.keep:
            shutil.rmtree(self.shm_dir, ignore_errors=True)


# ----------------------------------------------------------------------------- profile


_AREAS = [
    ("sqlalchemy", "SQLAlchemy (Core, engine, pool, async adaption)"),
    ("aiosqlite", "aiosqlite (hand-off to its worker thread)"),
    ("sqlite3", "sqlite3 driver"),
    ("asyncpg", "asyncpg"),
    ("starlette", "Starlette"),
    ("fastapi", "FastAPI"),
    ("uvicorn", "uvicorn (Python part)"),
    ("aiohttp", "aiohttp (upstream client)"),
    ("pydantic", "pydantic"),
    ("anyio", "anyio"),
    ("logging", "logging"),
    ("/app/", "budgetgate app/"),
    ("asyncio/runners.py", "uvloop/libuv native: event loop, sockets, httptools parsing"),
    ("asyncio", "asyncio (Python part)"),
    ("uuid", "uuid"),
    ("threading", "threading/queue"),
    ("queue.py", "threading/queue"),
    ("concurrent", "concurrent.futures"),
]
_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD_RE = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")


def _frame(frame: str) -> tuple[str, str, str]:
    """(func, file, line) of a py-spy raw frame 'func (file:line)'."""
    m = _FRAME_RE.match(frame.strip())
    if not m:
        return frame.strip(), "", ""
    return m.group("func"), m.group("file"), m.group("line") or ""


def _short(file: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3"):
        i = file.find(marker)
        if i >= 0:
            return file[i + len(marker) :].lstrip("/")
    return file


def _area(file: str) -> str:
    for needle, label in _AREAS:
        if needle in file:
            return label
    return "other (stdlib)"


def analyze_profile(raw: str, seconds: float, rate: int) -> dict[str, Any]:
    """From py-spy's collapsed stacks ('raw', recorded with --threads, idle excluded): how busy
    each thread was, and for the event-loop thread (MainThread: the one that caps throughput)
    the self share of each function (with its line) and library, and the inclusive share of
    each function; for any other busy thread (aiosqlite's worker) its leaf functions."""
    per_thread: Counter[str] = Counter()
    main_self: Counter[str] = Counter()
    main_incl: Counter[str] = Counter()
    main_area: Counter[str] = Counter()
    other_self: dict[str, Counter[str]] = {}
    tids: dict[str, str] = {}
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        m = _THREAD_RE.match(frames[0])
        thread = "?"
        if m:
            thread = (m.group("name") or m.group("tid")).strip()
            tids[thread] = m.group("tid")
            frames = frames[1:]
        per_thread[thread] += count
        parsed = [_frame(f) for f in frames]
        if not parsed:
            continue
        func, file, lineno = parsed[-1]
        leaf = f"{func} ({_short(file)}:{lineno})"
        if thread != "MainThread":
            other_self.setdefault(thread, Counter())[leaf] += count
            continue
        main_self[leaf] += count
        main_area[_area(file)] += count
        for n in {f"{fn} ({_short(fl)})" for fn, fl, _ in parsed}:
            main_incl[n] += count
    possible = max(1.0, seconds * rate)
    main_total = per_thread.get("MainThread", 0)
    return {
        "seconds": seconds,
        "rate": rate,
        "main_samples": main_total,
        "busy": {t: n / possible for t, n in per_thread.most_common()},
        "tids": tids,
        "self": main_self.most_common(40),
        "inclusive": main_incl.most_common(150),
        "areas": main_area.most_common(),
        "other_threads": {t: c.most_common(8) for t, c in other_self.items()},
    }


def print_profile(prof: dict[str, Any], top: int) -> None:
    total = prof["main_samples"] or 1
    load = prof["load"]
    print()
    print(
        f"py-spy profile of {prof['target']} under wrk -c32 non-streaming, "
        f"{prof['seconds']:g} s at {prof['rate']} Hz ({load['rps']:.0f} req/s while sampled; "
        "idle samples excluded)"
    )
    print(
        "  threads: share of the wall time py-spy saw them busy | CPU they used (from /proc), "
        "% of one core:"
    )
    for name, b in prof["busy"].items():
        tid = prof["tids"].get(name)
        used = prof.get("task_cpu", {}).get(tid) if tid else None
        cpu = f"{100 * used / prof['wall']:5.1f}%" if used is not None else "    ?"
        print(f"    {100 * b:5.1f}% | {cpu}  {name}")
    print("  MainThread (the event loop) -- self time by library:")
    for name, n in prof["areas"]:
        print(f"    {100 * n / total:5.1f}%  {name}")
    print(f"  MainThread -- top {top} functions by self time (% of its busy samples):")
    for name, n in prof["self"][:top]:
        print(f"    {100 * n / total:5.1f}%  {name}")
    incl = dict(prof["inclusive"])

    def share(suffix: str) -> float:
        return 100 * sum(n for k, n in incl.items() if k.startswith(suffix)) / total

    asgi = share("RequestResponseCycle.run_asgi (uvicorn/")
    endpoint = share("run_endpoint_function (fastapi/")
    print(
        f"  MainThread -- ASGI app {asgi:.1f}%, of which the proxy endpoint {endpoint:.1f}%: "
        f"FastAPI/Starlette routing + middleware outside the endpoint ≈ {asgi - endpoint:.1f}%"
    )
    print(f"  MainThread -- budgetgate and library functions by inclusive time (top {top}):")
    shown = 0
    for name, n in prof["inclusive"]:
        if "app/cli.py" in name or not any(
            x in name for x in ("app/", "sqlalchemy/", "aiohttp/", "aiosqlite/", "asyncpg/")
        ):
            continue
        print(f"    {100 * n / total:5.1f}%  {name}")
        shown += 1
        if shown >= top:
            break
    for thread, leaves in prof["other_threads"].items():
        if prof["busy"].get(thread, 0) < 0.05:
            continue
        print(f"  {thread} -- top leaf frames (samples):")
        for name, n in leaves[:6]:
            print(f"    {n:6d}  {name}")


# ----------------------------------------------------------------------------- report


def summarize(
    results: dict[tuple[str, str, int], list[dict[str, Any]]],
) -> dict[tuple[str, str, int], dict[str, Any]]:
    out: dict[tuple[str, str, int], dict[str, Any]] = {}
    for key, runs in results.items():
        mode = key[1]
        served = sum(r["requests"] for r in runs)
        cpu = {
            "cpu_ms": 1e3 * sum(r["cpu_s"] for r in runs) / served if served else float("nan"),
            "db_cpu_ms": 1e3 * sum(r["db_cpu_s"] for r in runs) / served if served else 0.0,
        }
        if mode == "json":
            rps = [r["rps"] for r in runs]
            out[key] = {
                "rps": statistics.median(rps),
                "spread": (max(rps) - min(rps)) / statistics.median(rps) if min(rps) > 0 else 0,
                "p50": statistics.median(r["p50"] for r in runs),
                "p99": statistics.median(r["p99"] for r in runs),
                "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs),
                "requests": sum(r["requests"] for r in runs),
                "rounds": [{k: r[k] for k in ("rps", "p50", "p99", "non2xx")} for r in runs],
            } | cpu
        else:
            ttfb = [x * 1e3 for r in runs for x in r["ttfb_s"]]
            total = [x * 1e3 for r in runs for x in r["total_s"]]
            rps = [r["rps"] for r in runs]
            wall = sum(r["wall_s"] for r in runs)
            out[key] = {
                "rps": sum(r["requests"] for r in runs) / wall if wall else 0.0,
                "spread": (max(rps) - min(rps)) / statistics.median(rps) if min(rps) > 0 else 0,
                "p50": pct(total, 50),
                "p99": pct(total, 99),
                "ttfb_p50": pct(ttfb, 50),
                "ttfb_p99": pct(ttfb, 99),
                "errors": sum(r["errors"] for r in runs),
                "error_kinds": sum((Counter(r["error_kinds"]) for r in runs), Counter()),
                "requests": sum(r["requests"] for r in runs),
                "client_cpu": max(r["client_cpu"] for r in runs),
                "rounds": [{"rps": r["rps"], "client_cpu": r["client_cpu"]} for r in runs],
            } | cpu
    return out


def fmt(v: float | None, spec: str = ".2f") -> str:
    if v is None or v != v:  # None or NaN
        return "-"
    return format(v, spec)


def cpu_cell(s: dict[str, Any]) -> str:
    cell = fmt(s["cpu_ms"])
    return cell + (f"+{s['db_cpu_ms']:.1f}" if s.get("db_cpu_ms") else "")


def print_table(
    summary: dict[tuple[str, str, int], dict[str, Any]], targets: list[Target]
) -> list[str]:
    """The table; returns notes about client-bound streaming runs."""
    notes: list[str] = []
    header = (
        f"{'mode':<10} {'conn':>4} {'target':<14} {'req/s':>8} {'±':>4} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'ttfb50':>7} {'ttfb99':>7} {'errors':>6} {'cpu ms/req':>10} │ {'×base':>6} "
        f"{'+p50 ms':>7} {'+ttfb50':>7}"
    )
    print(header)
    print("─" * len(header))
    cases = [("json", 1), ("json", 32), ("stream", 1), ("stream", 32)]
    for mode, conns in cases:
        base = summary.get(("baseline", mode, conns))
        for t in targets:
            s = summary.get((t.name, mode, conns))
            if s is None:
                continue
            is_base = t.name == "baseline"
            ratio = s["rps"] / base["rps"] if base and base["rps"] and not is_base else None
            dp50 = s["p50"] - base["p50"] if base and not is_base else None
            dttfb = (
                s["ttfb_p50"] - base["ttfb_p50"] if base and not is_base and mode == "stream"
                else None
            )  # fmt: skip
            label = "non-stream" if mode == "json" else "stream"
            print(
                f"{label:<10} {conns:>4} {t.label:<14} {s['rps']:>8.0f} "
                f"{fmt(100 * s['spread'], '.0f') + '%':>4} {fmt(s['p50']):>7} {fmt(s['p99']):>7} "
                f"{fmt(s.get('ttfb_p50')):>7} {fmt(s.get('ttfb_p99')):>7} {s['errors']:>6} "
                f"{cpu_cell(s):>10} │ "
                f"{fmt(ratio):>6} {fmt(dp50, '+.2f'):>7} {fmt(dttfb, '+.2f'):>7}"
            )
            if mode == "stream" and s.get("client_cpu", 0) >= 0.85:
                notes.append(
                    f"stream c={conns} {t.label}: the load client used "
                    f"{100 * s['client_cpu']:.0f}% of a core: it may have limited req/s"
                )
            if s["errors"] and mode == "stream":
                notes.append(f"stream c={conns} {t.label}: errors {dict(s['error_kinds'])}")
        print()
    return notes


def print_targets(
    summary: dict[tuple[str, str, int], dict[str, Any]],
    targets: list[Target],
    rss: dict[str, dict[str, float]],
    litellm_note: str | None = None,
    workers: int = 1,
) -> None:
    def get(name: str, mode: str, conns: int, k: str) -> float | None:
        s = summary.get((name, mode, conns))
        return None if s is None else s[k]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("Targets of the performance issue (reported, not asserted):")
    base_rps = get("baseline", "json", 32, "rps")
    gateways = [t for t in targets if t.gateway]
    for t in gateways:
        goal = TARGET_RPS_PG if t.name.startswith("pg") else TARGET_RPS_SQLITE
        rps = get(t.name, "json", 32, "rps")
        if rps is None or not base_rps:
            continue
        r = rps / base_rps
        print(
            f"  {t.label:<14} req/s at 32 conns ≥ {goal}× baseline: {r:.2f}×  {verdict(r >= goal)}"
        )
    for t in gateways:
        p50, b50 = get(t.name, "json", 1, "p50"), get("baseline", "json", 1, "p50")
        if p50 is not None and b50 is not None:
            d = p50 - b50
            print(
                f"  {t.label:<14} added p50 at 1 conn ≤ {TARGET_ADDED_P50_MS} ms: {d:+.2f} ms  "
                f"{verdict(d <= TARGET_ADDED_P50_MS)}"
            )
        f50, fb50 = get(t.name, "stream", 1, "ttfb_p50"), get("baseline", "stream", 1, "ttfb_p50")
        if f50 is not None and fb50 is not None:
            d = f50 - fb50
            print(
                f"  {t.label:<14} added TTFB p50 at 1 conn ≤ {TARGET_ADDED_TTFB_MS} ms: "
                f"{d:+.2f} ms  {verdict(d <= TARGET_ADDED_TTFB_MS)}"
            )
        m = rss.get(t.name, {})
        if "VmRSS" in m and workers > 1:
            print(
                f"  {t.label:<14} RSS after the runs ≤ {TARGET_RSS_MB:g} MB per process: "
                f"{m['VmRSS']:.0f} MiB summed over its {workers} workers and supervisor "
                "(measure the target with --workers 1)"
            )
        elif "VmRSS" in m:
            print(
                f"  {t.label:<14} RSS after the runs ≤ {TARGET_RSS_MB:g} MB: "
                f"{m['VmRSS']:.0f} MiB (peak {m.get('VmHWM', 0):.0f} MiB)  "
                f"{verdict(m['VmRSS'] <= TARGET_RSS_MB)}"
            )
    lite_rps = get("litellm", "json", 32, "rps")
    if lite_rps is None:
        print(
            f"  gateway req/s at 32 conns ≥ {TARGET_VS_LITELLM:g}× litellm: no LiteLLM row: "
            f"{litellm_note or 'not measured'}"
        )
        return
    for t in gateways:
        rps = get(t.name, "json", 32, "rps")
        if rps is None:
            continue
        if not lite_rps:
            print(
                f"  {t.label:<14} req/s at 32 conns ≥ {TARGET_VS_LITELLM:g}× litellm: "
                "litellm served 0 req/s  -"
            )
            continue
        r = rps / lite_rps
        print(
            f"  {t.label:<14} req/s at 32 conns ≥ {TARGET_VS_LITELLM:g}× litellm: {r:.1f}×  "
            f"{verdict(r >= TARGET_VS_LITELLM)}"
        )


def print_phases(phases: dict[str, dict[int, dict[str, Any]]], targets: list[Target]) -> None:
    labels = {t.name: t.label for t in targets}
    cols = [(name, c) for name in phases for c in sorted(phases[name]) if c]
    if not cols:
        return
    print()
    print(
        "Where a gateway request's time goes (bench/phases.py: instrumented gateway, wrk "
        "non-streaming; wall ms per request, p50 / mean; nested steps are indented):"
    )
    heads = [f"{labels[n]} c={c}" for n, c in cols]
    width = max(16, *(len(h) for h in heads)) + 2
    print(f"  {'':<36}" + "".join(f"{h:>{width}}" for h in heads))
    rps = [f"{phases[n][c]['load']['rps']:.0f} req/s" for n, c in cols]
    print(f"  {'(throughput while measured)':<36}" + "".join(f"{r:>{width}}" for r in rps))
    order = [
        "handle (to response object)",
        "read body",
        "admit (authenticate + reserve)",
        "  admit: HotLedger.admit",
        "upstream send (to headers)",
        "upstream body read",
        "settle",
        "  settle: HotLedger.settle",
    ]
    for n, c in cols:
        for k in phases[n][c]["phases"]:
            if k not in order:
                order.append(k)
    for k in order:
        cells = []
        for n, c in cols:
            ph = phases[n][c]["phases"].get(k)
            cells.append(f"{ph['p50_ms']:.2f} / {ph['mean_ms']:.2f}" if ph else "-")
        if all(x == "-" for x in cells):
            continue
        print(f"  {k:<36}" + "".join(f"{x:>{width}}" for x in cells))
    print("  per request (counted with SQLAlchemy events / an aiosqlite hook):")
    keys = [
        "transactions begun",
        "  commits",
        "  rollbacks",
        "pool checkouts",
        "pool resets (rollback on return)",
        "SQL statements (incl. BEGIN IMMEDIATE)",
        "  BEGIN",
        "  SELECT",
        "  UPDATE",
        "  INSERT",
        "  DELETE",
        "SQL compilations (statement cache misses)",
        "aiosqlite thread hops",
    ]
    for n, c in cols:
        for k in phases[n][c]["per_request"]:
            if k not in keys:
                keys.append(k)
    for k in keys:
        cells = [f"{phases[n][c]['per_request'].get(k, 0):.1f}" for n, c in cols]
        if all(x == "0.0" for x in cells):
            continue
        print(f"  {k:<36}" + "".join(f"{x:>{width}}" for x in cells))
    micro = [(n, phases[n][0]["micro"]) for n in phases if 0 in phases[n]]
    if micro:
        print()
        print(
            "Ledger micro-benchmark (bench/ledger_micro.py: authenticate + reserve + settle "
            "in-process, sequential; then the same SQL and transactions on the bare driver):"
        )
        for name, text in micro:
            print(f"  [{labels[name]}]")
            for line in text.splitlines():
                print("  " + line)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark budgetgate against a bare pass-through proxy (see bench/README.md)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all runs (default 2)")
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 round: a smoke test")
    p.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL gateway")
    p.add_argument(
        "--keys",
        type=int,
        default=1,
        help="API keys per gateway, each with its own budget; the load generators take turns "
        "with them request by request (default 1: every request on one key, its budget's row "
        "the one all of them update)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes for every server alike: baseline, gateways (serve --workers), "
        "LiteLLM (--num_workers); CPU and RSS are then summed over each server's processes "
        "(default 1)",
    )
    p.add_argument(
        "--ledger",
        choices=["durable", "fast", "both"],
        default="both",
        help="durable: SQLite file in the temp dir (WAL, synchronous=normal), PostgreSQL with "
        "synchronous_commit=on; fast: SQLite on /dev/shm (tmpfs), PostgreSQL database with "
        "synchronous_commit=off -- the gateway's CPU cost without the disk's fsync latency "
        "(default: both)",
    )
    p.add_argument(
        "--stream-delay-ms",
        type=int,
        default=0,
        help="x-mock-delay-ms for streaming runs: the mock sleeps this long before each SSE "
        "event (default 0: the whole stream comes in one write)",
    )
    p.add_argument(
        "--litellm",
        metavar="PATH",
        help="the `litellm` executable for the LiteLLM row (default: $BUDGETGATE_LITELLM_BIN, "
        "else .litellm-venv/bin/litellm when it exists; without one the row is left out)",
    )
    p.add_argument(
        "--no-litellm", action="store_true", help="leave out the LiteLLM row even when installed"
    )
    p.add_argument("--profile", action="store_true", help="also profile a gateway with py-spy")
    p.add_argument(
        "--profile-target",
        default="sqlite-shm",
        choices=["sqlite", "sqlite-shm", "pg", "pg-async", "baseline", "litellm"],
    )
    p.add_argument("--profile-seconds", type=float, default=10.0)
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--profile-keep", help="copy py-spy's raw collapsed stacks to this file")
    p.add_argument("--profile-only", action="store_true", help="skip the table: profile only")
    p.add_argument(
        "--phases",
        action="store_true",
        help="also time each gateway's request phases and count its DB work per request "
        "(bench/phases.py), and run bench/ledger_micro.py on each ledger",
    )
    p.add_argument("--phases-seconds", type=float, default=5.0)
    p.add_argument("--micro-iterations", type=int, default=500)
    p.add_argument("--json", help="also write all results (every round) as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ledger)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.rounds = min(args.duration, 3.0), 1
    if args.profile_only:
        args.profile = True
    return args


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = ensure_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="bg-bench-"))
    bench = Bench(args, tmp, wrk)
    # Ctrl-C / SIGTERM: tear everything down (the finally below).
    signal.signal(signal.SIGTERM, _interrupt)
    rc = 0
    try:
        bench.setup()
        bench.smoke()
        summary: dict[tuple[str, str, int], dict[str, Any]] = {}
        results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        if not args.profile_only:
            bench.warmup()
            load_before = loadavg()
            t0 = time.monotonic()
            results = bench.measure()
            summary = summarize(results)
            elapsed = time.monotonic() - t0
        rss = {t.name: rss_of_proc(t.proc) for t in bench.targets}
        prof = bench.profile() if args.profile else None
        phases = bench.phases() if args.phases else {}
        rss_after_profile = {t.name: rss_of_proc(t.proc) for t in bench.targets}
        for p in bench.procs:  # graceful stop: in-flight requests settle before reconcile
            if p.name.startswith(("sqlite", "pg")):
                p.stop()
        recon = {t.name: bench.reconcile(t) for t in bench.targets if t.env is not None}

        print()
        if summary:
            pg_note = f", ledger: {args.ledger}" + (
                f", {args.keys} API keys per gateway" if args.keys > 1 else ", one API key"
            )
            print(
                f"budgetgate bench: {args.rounds} round(s) × {args.duration:g} s per run, "
                f"{os.cpu_count()} CPUs, wrk 1 thread; stream runs by bench/stream_client.py; "
                f"max_tokens={MAX_TOKENS}"
                + (
                    f", stream delay {args.stream_delay_ms} ms/event"
                    if args.stream_delay_ms
                    else ""
                )
                + pg_note
                + f"; {elapsed:.0f} s of runs"
            )
            for line in (
                "req/s: median over rounds (stream: all rounds pooled); ±: spread of req/s "
                "between rounds",
                "p50/p99: latency in ms (stream: time to last byte); ttfb50/99: time to first "
                "body byte",
                "errors: non-2xx + socket errors (stream: also broken or error-event streams)",
                "cpu ms/req: CPU of the server process (all threads; with --workers N, all "
                "its processes) per request [+ the PostgreSQL cluster's]",
                f"workers: {args.workers} per server (baseline, gateways, LiteLLM alike)",
                "×base: req/s ÷ baseline's; +p50 / +ttfb50: ms added over the baseline's p50",
                "gw/sqlite: ledger file on disk (WAL, synchronous=normal); gw/sqlite-shm: on tmpfs; "
                "gw/pg: synchronous_commit=on; gw/pg-async: =off",
                f"litellm: the LiteLLM proxy, {args.workers} worker(s), no database, master key, "
                "model bg-bench "
                "-> the same mock upstream"
                + (f" ({bench.litellm_note})" if bench.litellm_note else ""),
                f"load average before / after the runs: {load_before} / {loadavg()} "
                "(other work on the machine skews all rows alike: runs alternate)",
            ):
                print("  " + line)
            print()
            notes = print_table(summary, bench.targets)
            for n in notes:
                print(f"note: {n}")
            if notes:
                print()
            print_targets(summary, bench.targets, rss, bench.litellm_note, args.workers)
            print()
        print("Memory after the runs (from /proc/<pid>/status):")
        for t in bench.targets:
            m = rss.get(t.name, {})
            m2 = rss_after_profile.get(t.name, {})
            extra = (
                f"; after the profile run {m2.get('VmRSS', 0):.1f} MiB"
                if prof and t.name == args.profile_target else ""
            )  # fmt: skip
            print(
                f"  {t.label:<14} pid {t.proc.pid:<7} VmRSS {m.get('VmRSS', 0):6.1f} MiB  "
                f"VmHWM (peak) {m.get('VmHWM', 0):6.1f} MiB{extra}"
            )
        print()
        print("budgetgate reconcile (after the gateways stopped):")
        for name, r in recon.items():
            label = next(t.label for t in bench.targets if t.name == name)
            status = "ledger is consistent" if r.get("ok") else "PROBLEMS"
            print(
                f"  {label:<14} {status}: {r.get('periods_checked', '?')} periods, "
                f"{r.get('entries_checked', '?')} ledger entries checked (exit {r['exit']})"
            )
            for problem in r.get("problems", [])[:10]:
                print(f"    PROBLEM: {problem}")
            if not r.get("ok"):
                rc = 1
        if phases:
            print_phases(phases, bench.targets)
        if prof:
            print_profile(prof, args.profile_top)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "args": vars(args),
                        "runs": {"/".join(map(str, k)): v for k, v in results.items()},
                        "summary": {
                            "/".join(map(str, k)): {kk: vv for kk, vv in v.items()}
                            for k, v in summary.items()
                        },
                        "rss_mib": rss,
                        "reconcile": recon,
                        "profile": prof,
                        "phases": phases,
                    },
                    default=str,
                    indent=1,
                )
            )
    except KeyboardInterrupt:
        say("bench: interrupted")
        rc = 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        say(f"bench: FAILED: {exc}")
        for p in bench.procs:
            say(f"--- {p.name} log tail ({p.log_path}) ---\n{p.log_tail(15)}")
        rc = 1
    finally:
        bench.cleanup()
        if args.keep:
            say(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())

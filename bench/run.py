#!/usr/bin/env python3
"""`make bench`: what the gateway costs over a bare pass-through proxy.

Starts, each as its own process:

* the project's mock upstream (`budgetgate mock-upstream`);
* the baseline: bench/baseline_proxy.py, a bare uvicorn + Starlette + aiohttp pass-through
  (no auth, no ledger; same uvicorn and gc settings as the gateway) -- the floor;
* the gateway on SQLite (`budgetgate serve`, a fresh ledger file in a temp dir);
* the gateway on PostgreSQL, when server binaries exist (a throwaway PgCluster from
  tests/pgcluster.py; `budgetgate migrate`, then `budgetgate serve`);
* each gateway once more as a "5 budgets" row: a key in a team and of a user, with a window
  narrowed to the model, whose requests name an end user (`--no-scoped` leaves them out);
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

This module is the orchestrator; the servers are started by harness.py, driven by load.py and
reported by report.py (the profile read by pyspy_profile.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    Rig,
    Target,
    free_port,
    http,
    litellm_bin,
    loadavg,
    rss_of_proc,
    say,
    task_cpu,
)
from load import ensure_wrk, run_stream, run_wrk
from pyspy_profile import analyze_profile, ensure_py_spy, print_profile
from report import (
    print_header,
    print_memory,
    print_phases,
    print_reconcile,
    print_table,
    print_targets,
    summarize,
)


@dataclass
class Bench:
    """The runs of one `make bench` on the servers of `rig`."""

    args: argparse.Namespace
    rig: Rig
    wrk: str
    results: dict[tuple[str, str, int], list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def targets(self) -> list[Target]:
        return self.rig.targets

    def setup(self) -> None:
        rig = self.rig
        rig.write_inputs()
        rig.start_mock_upstream()
        rig.start_baseline()
        kinds = ("durable", "fast") if self.args.ledger == "both" else (self.args.ledger,)
        gateways = [rig.start_sqlite_gateway(kind) for kind in kinds]
        if self.args.no_pg:
            say("bench: PostgreSQL skipped (--no-pg)")
        else:
            gateways += [rig.start_pg_gateway(kind) for kind in kinds]
        if not self.args.no_scoped:
            for gateway in gateways:
                if gateway is not None and gateway.name in ("sqlite", "pg"):
                    rig.add_scoped_target(gateway)
        rig.start_litellm(*litellm_bin(self.args.litellm, self.args.no_litellm))

    # -- measuring -----------------------------------------------------------------------

    def run_wrk(self, t: Target, conns: int, duration: float) -> dict[str, Any]:
        body = t.json_body or self.rig.json_body
        assert body is not None
        return run_wrk(self.wrk, t.url, t.keys, body, conns, duration)

    def run_stream(
        self, t: Target, conc: int, duration: float, warmup: float = 0.0
    ) -> dict[str, Any]:
        body = t.stream_body or self.rig.stream_body
        assert body is not None
        out = self.rig.tmp / "stream-result.json"
        return run_stream(
            t.url, t.keys, body, out, conc, duration, warmup,
            self.args.stream_delay_ms,
        )  # fmt: skip

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
        raw = self.rig.tmp / f"profile-{name}.txt"
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
            proc = self.rig.start(
                f"phases-{t.name}",
                [
                    sys.executable,
                    str(BENCH / "phases.py"),
                    "--port",
                    str(port),
                    "--out",
                    str(self.rig.tmp / f"phases-{t.name}.json"),
                ],  # fmt: skip
                t.env,
                port,
                "/healthz",
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
                self.rig.procs.remove(proc)
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
                cwd=self.rig.tmp,
                capture_output=True,
                text=True,
                timeout=600,
            )
            out.setdefault(t.name, {})[0] = {
                "micro": micro.stdout.strip() or micro.stderr.strip()[-2000:]
            }
        return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark budgetgate against a bare pass-through proxy (see bench/README.md)"
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over all runs (default 2)")
    p.add_argument("--quick", action="store_true", help="3 s runs, 1 round: a smoke test")
    p.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL gateway")
    p.add_argument(
        "--no-scoped",
        action="store_true",
        help="skip the rows of a key held by five budgets (key, model window, team, user, "
        "end user)",
    )
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
    rig = Rig(tmp, workers=args.workers, keys=args.keys, keep=args.keep)
    bench = Bench(args, rig, wrk)
    # Ctrl-C / SIGTERM: tear everything down (the finally below).
    signal.signal(signal.SIGTERM, _interrupt)
    rc = 0
    try:
        bench.setup()
        rig.smoke()
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
        rig.stop_gateways()
        recon = {t.name: rig.reconcile(t) for t in bench.targets if t.env is not None}

        print()
        if summary:
            print_header(
                args.rounds, args.duration, args.ledger, args.keys, args.workers,
                args.stream_delay_ms, elapsed, rig.litellm_note, load_before, loadavg(),
            )  # fmt: skip
            notes = print_table(summary, bench.targets)
            for n in notes:
                print(f"note: {n}")
            if notes:
                print()
            print_targets(summary, bench.targets, rss, rig.litellm_note, args.workers)
            print()
        print_memory(bench.targets, rss, rss_after_profile, args.profile_target if prof else None)
        if not print_reconcile(recon, bench.targets):
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
        for p in rig.procs:
            say(f"--- {p.name} log tail ({p.stderr_path}) ---\n{p.log_tail(15)}")
        rc = 1
    finally:
        rig.cleanup()
        if args.keep:
            say(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())

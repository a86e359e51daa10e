#!/usr/bin/env python3
"""`make soak`: does the gateway stay as fast after ten minutes of steady load as it was fresh?

One gateway on a durable ledger (PostgreSQL with fsync and synchronous_commit on; SQLite, a
file in the temp dir), one key, the mock upstream. Every minute of `--minutes`: wrk at 32
connections for most of it, then a probe at 1 connection; then the ledger's tables are read
(PostgreSQL: pg_stat_user_tables and pg_total_relation_size; SQLite: dbstat, the free list and
the file sizes) and the gateway's RSS. One line per minute as it goes; at the end the whole
run as a Markdown table, whether the figures drifted, and `budgetgate reconcile`.

    make soak                                    # 10 minutes on PostgreSQL, then on SQLite
    SOAK_MINUTES=60 make soak                    # the long run
    .venv/bin/python bench/soak.py --minutes 3 --ledger sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Rig, Target, loadavg, rss_of, say
from load import ensure_wrk, run_wrk

# What the soak must show (reported, never asserted): the last minute against the first.
DRIFT_P50 = 0.15  # p50 at 1 connection within 15 %
DRIFT_RPS = 0.10  # req/s at 32 connections within 10 %


@dataclass
class TableStats:
    name: str
    bytes: int  # the table with its indexes (and TOAST)
    live: int | None = None  # PostgreSQL: n_live_tup
    dead: int | None = None  # PostgreSQL: n_dead_tup
    inserted: int | None = None
    updated: int | None = None
    hot_updated: int | None = None
    deleted: int | None = None
    autovacuums: int | None = None


@dataclass
class Minute:
    minute: int
    rps32: float
    errors: int
    p50: float
    p99: float
    rss_mib: float
    load: str
    tables: list[TableStats]
    files: dict[str, int] = field(default_factory=dict)  # SQLite: db, -wal, free pages
    # CPU per request at 32 connections (ms): the gateway's, and the PostgreSQL cluster's.
    # The neighbours' load moves them much less than req/s and latency.
    cpu_ms: float = 0.0
    db_cpu_ms: float = 0.0


# ----------------------------------------------------------------------------- table figures

PG_TABLE_STATS = """
SELECT relname, pg_total_relation_size(relid), n_live_tup, n_dead_tup, n_tup_ins, n_tup_upd,
       n_tup_hot_upd, n_tup_del, autovacuum_count
FROM pg_stat_user_tables WHERE relname <> 'alembic_version' ORDER BY relname
"""


def pg_tables(rig: Rig, dbname: str) -> list[TableStats]:
    assert rig.cluster is not None
    out = []
    for line in rig.cluster.psql(PG_TABLE_STATS, dbname=dbname).splitlines():
        if not line.strip():
            continue
        name, *nums = line.split("|")
        n = [int(x) for x in nums]
        out.append(TableStats(name, n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]))
    return out


def sqlite_tables(path: Path) -> tuple[list[TableStats], dict[str, int]]:
    """Bytes per table (its indexes included) from dbstat, and the files and free pages."""
    files = {
        "db": path.stat().st_size if path.exists() else 0,
        "wal": (path.with_name(path.name + "-wal")).stat().st_size
        if path.with_name(path.name + "-wal").exists()
        else 0,
    }
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        files["free_pages"] = con.execute("PRAGMA freelist_count").fetchone()[0]
        files["page_size"] = con.execute("PRAGMA page_size").fetchone()[0]
        owner = dict(con.execute("SELECT name, tbl_name FROM sqlite_schema").fetchall())
        sizes: dict[str, int] = {}
        try:
            rows = con.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall()
        except sqlite3.OperationalError:  # no dbstat compiled in: the whole file only
            rows = []
        for name, size in rows:
            table = owner.get(name, name)
            if table.startswith("sqlite_") or table == "alembic_version":
                continue
            sizes[table] = sizes.get(table, 0) + int(size)
    finally:
        con.close()
    return [TableStats(n, b) for n, b in sorted(sizes.items())], files


# ----------------------------------------------------------------------------- the run


def soak_one(ledger: str, args: argparse.Namespace, wrk: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bg-soak-"))
    rig = Rig(tmp, keep=args.keep)
    minutes: list[Minute] = []
    recon: dict[str, Any] = {}
    try:
        rig.write_inputs()
        rig.start_mock_upstream()
        target: Target | None
        if ledger == "postgres":
            target = rig.start_pg_gateway("durable")
            if target is None:
                return {"ledger": ledger, "skipped": "no PostgreSQL server binaries"}
        else:
            target = rig.start_sqlite_gateway("durable")
            assert target is not None
        rig.smoke()
        assert rig.json_body is not None
        probe_s = args.probe_seconds
        load_s = args.minute_seconds - probe_s - 2.0  # ~2 s for the figures and the gaps
        say(f"soak: {ledger}, {args.minutes} minute(s): wrk -c32 {load_s:g}s + -c1 {probe_s:g}s")
        print(f"\nsoak on {ledger} (load average at the start: {loadavg()})", flush=True)
        for m in range(1, args.minutes + 1):
            cpu0 = target.cpu()
            load = run_wrk(wrk, target.url, target.keys, rig.json_body, 32, load_s)
            cpu1 = target.cpu()
            served = max(1, load["requests"])
            probe = run_wrk(wrk, target.url, target.keys, rig.json_body, 1, probe_s)
            files: dict[str, int] = {}
            if ledger == "postgres":
                tables = pg_tables(rig, "budgetgate_bench")
            else:
                tables, files = sqlite_tables(rig.tmp / "ledger.db")
            assert target.proc.pid is not None
            row = Minute(
                m,
                load["rps"],
                load["non2xx"] + load["socket_errors"] + probe["non2xx"] + probe["socket_errors"],
                probe["p50"],
                probe["p99"],
                rss_of(target.proc.pid).get("VmRSS", 0.0),
                loadavg(),
                tables,
                files,
                1e3 * (cpu1[0] - cpu0[0]) / served,
                1e3 * (cpu1[1] - cpu0[1]) / served,
            )
            minutes.append(row)
            print(progress_line(row), flush=True)
        rig.stop_gateways()
        recon = rig.reconcile(target)
        final: list[TableStats] = []
        if ledger == "postgres":
            final = pg_tables(rig, "budgetgate_bench")
        return {"ledger": ledger, "minutes": minutes, "reconcile": recon, "final": final}
    finally:
        rig.cleanup()
        if args.keep:
            say(f"soak: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- report


def mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def table_cell(t: TableStats) -> str:
    if t.dead is None:
        return f"{mb(t.bytes)} MB"
    return f"{mb(t.bytes)} MB / {t.dead:,} dead"


def cpu_cell(m: Minute) -> str:
    return f"{m.cpu_ms:.3f}" + (f" + {m.db_cpu_ms:.3f}" if m.db_cpu_ms else "")


def progress_line(m: Minute) -> str:
    tables = ", ".join(
        f"{t.name} {table_cell(t)}" + (f" (av {t.autovacuums})" if t.autovacuums else "")
        for t in m.tables
        if t.bytes > 16384 or t.dead
    )
    files = (
        f"; file {mb(m.files['db'])} MB + wal {mb(m.files['wal'])} MB, "
        f"{m.files.get('free_pages', 0)} free pages"
        if m.files
        else ""
    )
    return (
        f"  min {m.minute:>2}: {m.rps32:7.0f} req/s @32 (CPU/req {cpu_cell(m)} ms), p50 "
        f"{m.p50:5.2f} ms p99 {m.p99:6.2f} ms @1, errors {m.errors}, RSS {m.rss_mib:.0f} MiB, "
        f"load {m.load} | {tables}{files}"
    )


def shown_tables(minutes: list[Minute]) -> list[str]:
    """The tables that change under load, and every ledger table the request path writes."""
    first = {t.name: t for t in minutes[0].tables}
    return [
        t.name
        for t in minutes[-1].tables
        if t.name not in ("api_keys", "budgets", "budget_alerts")
        or t.bytes != first.get(t.name, t).bytes
        or (t.dead or 0) > 0
    ]


def print_markdown(result: dict[str, Any]) -> None:
    minutes: list[Minute] = result["minutes"]
    names = shown_tables(minutes)
    print()
    cpu = "CPU ms/req @32" + (" (+ PostgreSQL)" if minutes[0].db_cpu_ms else "")
    head = ["min", "req/s @32", cpu, "p50 @1 ms", "p99 @1 ms", "RSS MiB", "load avg", *names]
    if minutes[0].files:
        head += ["file + wal MB", "free pages"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for m in minutes:
        by_name = {t.name: t for t in m.tables}
        cells = [
            str(m.minute),
            f"{m.rps32:.0f}",
            cpu_cell(m),
            f"{m.p50:.2f}",
            f"{m.p99:.2f}",
            f"{m.rss_mib:.0f}",
            m.load.split()[0],
            *(table_cell(by_name[n]) if n in by_name else "-" for n in names),
        ]
        if m.files:
            cells += [f"{mb(m.files['db'])} + {mb(m.files['wal'])}", str(m.files["free_pages"])]
        print("| " + " | ".join(cells) + " |")


def print_verdict(result: dict[str, Any]) -> bool:
    minutes: list[Minute] = result["minutes"]
    first, last = minutes[0], minutes[-1]
    dp50 = last.p50 / first.p50 - 1 if first.p50 else 0.0
    drps = last.rps32 / first.rps32 - 1 if first.rps32 else 0.0
    ok_p50, ok_rps = abs(dp50) <= DRIFT_P50, abs(drps) <= DRIFT_RPS
    print()
    print(f"Drift on {result['ledger']}, last minute against the first (reported, not asserted):")
    print(
        f"  p50 at 1 connection {first.p50:.2f} -> {last.p50:.2f} ms ({100 * dp50:+.1f} %, "
        f"within {100 * DRIFT_P50:.0f} %: {'met' if ok_p50 else 'MISSED'})"
    )
    print(
        f"  req/s at 32 connections {first.rps32:.0f} -> {last.rps32:.0f} ({100 * drps:+.1f} %, "
        f"within {100 * DRIFT_RPS:.0f} %: {'met' if ok_rps else 'MISSED'})"
    )
    dead = {t.name: 0 for t in last.tables}
    for m in minutes:
        for t in m.tables:
            dead[t.name] = max(dead[t.name], t.dead or 0)
    if any(t.dead is not None for t in last.tables):
        worst = max(dead.items(), key=lambda kv: kv[1])
        print(f"  most dead tuples in any table at any minute: {worst[1]:,} ({worst[0]})")
    print(
        f"  CPU per request at 32 connections {cpu_cell(first)} -> {cpu_cell(last)} ms "
        "(gateway + PostgreSQL)"
    )
    errors = sum(m.errors for m in minutes)
    print(f"  errors: {errors}")
    final: list[TableStats] = result.get("final") or []
    if final:
        print("  per-request table activity over the whole run (pg_stat_user_tables):")
        for t in final:
            if t.inserted or t.updated or t.deleted:
                print(
                    f"    {t.name:<18} inserted {t.inserted:>9,} updated {t.updated:>9,} "
                    f"(HOT {t.hot_updated:>9,}) deleted {t.deleted:>9,} "
                    f"autovacuums {t.autovacuums}"
                )
    r = result["reconcile"]
    status = "ledger is consistent" if r.get("ok") else "PROBLEMS"
    print(
        f"  budgetgate reconcile: {status}: {r.get('periods_checked', '?')} periods, "
        f"{r.get('entries_checked', '?')} ledger entries checked (exit {r.get('exit')})"
    )
    for problem in r.get("problems", [])[:10]:
        print(f"    PROBLEM: {problem}")
    return bool(r.get("ok"))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak: the gateway under steady load for minutes")
    p.add_argument(
        "--minutes",
        type=int,
        default=int(os.environ.get("SOAK_MINUTES", "10")),
        help="minutes per ledger (default $SOAK_MINUTES, else 10; 60 for a long run)",
    )
    p.add_argument("--ledger", choices=["postgres", "sqlite", "both"], default="both")
    p.add_argument(
        "--probe-seconds",
        type=float,
        default=8.0,
        help="seconds of each minute at 1 connection (p50/p99); the rest at 32 (default 8)",
    )
    p.add_argument(
        "--minute-seconds",
        type=float,
        default=60.0,
        help="length of a 'minute' (default 60; shorter only to try the harness out)",
    )
    p.add_argument("--json", help="also write every minute's figures as JSON to this file")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, ledger)")
    args = p.parse_args(argv)
    if args.minutes < 1:
        p.error("--minutes must be at least 1")
    if args.minute_seconds < args.probe_seconds + 4:
        p.error("--minute-seconds must leave at least 2 s of load after the probe")
    return args


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = ensure_wrk()
    signal.signal(signal.SIGTERM, _interrupt)
    ledgers = ["postgres", "sqlite"] if args.ledger == "both" else [args.ledger]
    results = []
    rc = 0
    try:
        for ledger in ledgers:
            result = soak_one(ledger, args, wrk)
            results.append(result)
            if "skipped" in result:
                print(f"\nsoak on {ledger}: skipped ({result['skipped']})")
                continue
            print_markdown(result)
            if not print_verdict(result):
                rc = 1
    except KeyboardInterrupt:
        say("soak: interrupted")
        return 130
    except RuntimeError as exc:
        say(f"soak: FAILED: {exc}")
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(results, default=lambda o: o.__dict__, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())

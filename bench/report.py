"""The benchmark's report: the summary of each case's runs, the table, the targets of the
performance issue (reported, never asserted), memory, reconcile and the phase tables."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from typing import Any

from harness import MAX_TOKENS, Target
from load import pct

# What the performance issue asks for (reported against, not asserted).
TARGET_RPS_SQLITE = 0.6
TARGET_RPS_PG = 0.5
# A request held by five budgets (the scoped rows: key, model window, team, user, end user).
TARGET_RPS_SCOPED_SQLITE = 0.5
TARGET_RPS_SCOPED_PG = 0.4
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_TTFB_MS = 1.0
TARGET_RSS_MB = 150.0
TARGET_VS_LITELLM = 25.0  # gateway req/s at 32 conns ≥ 25× LiteLLM's (1 worker each)


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
        pg, scoped = t.name.startswith("pg"), t.name.endswith("-5")
        goal = {
            (False, False): TARGET_RPS_SQLITE,
            (True, False): TARGET_RPS_PG,
            (False, True): TARGET_RPS_SCOPED_SQLITE,
            (True, True): TARGET_RPS_SCOPED_PG,
        }[(pg, scoped)]
        rps = get(t.name, "json", 32, "rps")
        if rps is None or not base_rps:
            continue
        r = rps / base_rps
        print(
            f"  {t.label:<22} req/s at 32 conns ≥ {goal}× baseline: {r:.2f}×  {verdict(r >= goal)}"
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


def print_header(
    rounds: int,
    duration: float,
    ledger: str,
    keys: int,
    workers: int,
    stream_delay_ms: int,
    elapsed: float,
    litellm_note: str | None,
    load_before: str,
    load_after: str,
) -> None:
    pg_note = f", ledger: {ledger}" + (
        f", {keys} API keys per gateway" if keys > 1 else ", one API key"
    )
    print(
        f"budgetgate bench: {rounds} round(s) × {duration:g} s per run, "
        f"{os.cpu_count()} CPUs, wrk 1 thread; stream runs by bench/stream_client.py; "
        f"max_tokens={MAX_TOKENS}"
        + (f", stream delay {stream_delay_ms} ms/event" if stream_delay_ms else "")
        + pg_note
        + f"; {elapsed:.0f} s of runs"
    )
    for line in (
        "req/s: median over rounds (stream: all rounds pooled); ±: spread of req/s between rounds",
        "p50/p99: latency in ms (stream: time to last byte); ttfb50/99: time to first body byte",
        "errors: non-2xx + socket errors (stream: also broken or error-event streams)",
        "cpu ms/req: CPU of the server process (all threads; with --workers N, all "
        "its processes) per request [+ the PostgreSQL cluster's]",
        f"workers: {workers} per server (baseline, gateways, LiteLLM alike)",
        "×base: req/s ÷ baseline's; +p50 / +ttfb50: ms added over the baseline's p50",
        "gw/sqlite: ledger file on disk (WAL, synchronous=normal); gw/sqlite-shm: on tmpfs; "
        "gw/pg: synchronous_commit=on; gw/pg-async: =off",
        f"litellm: the LiteLLM proxy, {workers} worker(s), no database, master key, "
        "model bg-bench "
        "-> the same mock upstream" + (f" ({litellm_note})" if litellm_note else ""),
        f"load average before / after the runs: {load_before} / {load_after} "
        "(other work on the machine skews all rows alike: runs alternate)",
    ):
        print("  " + line)
    print()


def print_memory(
    targets: list[Target],
    rss: dict[str, dict[str, float]],
    rss_after_profile: dict[str, dict[str, float]],
    profiled: str | None,
) -> None:
    print("Memory after the runs (from /proc/<pid>/status):")
    for t in targets:
        m = rss.get(t.name, {})
        m2 = rss_after_profile.get(t.name, {})
        extra = (
            f"; after the profile run {m2.get('VmRSS', 0):.1f} MiB" if t.name == profiled else ""
        )
        print(
            f"  {t.label:<14} pid {t.proc.pid:<7} VmRSS {m.get('VmRSS', 0):6.1f} MiB  "
            f"VmHWM (peak) {m.get('VmHWM', 0):6.1f} MiB{extra}"
        )
    print()


def print_reconcile(recon: dict[str, dict[str, Any]], targets: list[Target]) -> bool:
    """Each ledger's `budgetgate reconcile`; returns whether all of them are consistent."""
    print("budgetgate reconcile (after the gateways stopped):")
    all_ok = True
    for name, r in recon.items():
        label = next(t.label for t in targets if t.name == name)
        status = "ledger is consistent" if r.get("ok") else "PROBLEMS"
        print(
            f"  {label:<14} {status}: {r.get('periods_checked', '?')} periods, "
            f"{r.get('entries_checked', '?')} ledger entries checked (exit {r['exit']})"
        )
        for problem in r.get("problems", [])[:10]:
            print(f"    PROBLEM: {problem}")
        all_ok = all_ok and bool(r.get("ok"))
    return all_ok

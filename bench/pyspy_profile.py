"""`--profile`: a py-spy recording of a server under load, read into where its time goes.

`analyze_profile` reads py-spy's collapsed stacks (recorded with --threads, idle excluded);
`print_profile` prints the result (see bench/README.md, "Diagnosis").
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from harness import say

BIN = Path(sys.executable).parent  # the venv's bin: py-spy


def ensure_py_spy() -> str:
    for cand in (BIN / "py-spy", shutil.which("py-spy")):
        if cand and Path(cand).exists():
            return str(cand)
    say("bench: installing py-spy into the venv (pip install py-spy) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    if (BIN / "py-spy").exists():
        return str(BIN / "py-spy")
    sys.exit("bench: --profile needs py-spy and `pip install py-spy` failed")


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

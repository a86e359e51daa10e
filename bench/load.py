"""Load drivers: wrk for whole answers, bench/stream_client.py for streams.

Each run returns one dict: requests/s, requests, p50/p99 in ms and the error counts (for
streams also the time to first byte per request and the client's own CPU use).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import BENCH, say


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


def run_wrk(
    wrk: str, url: str, keys: list[str], body: Path, conns: int, duration: float
) -> dict[str, Any]:
    """`wrk -t1 -cN --latency` with bench/post.lua: POST `body`, the keys taken in turn."""
    env = dict(os.environ, BENCH_BODY_FILE=str(body), BENCH_KEY=",".join(keys))
    argv = [
        wrk, "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s", "--latency",
        "--timeout", "10s", "-s", str(BENCH / "post.lua"), url,
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    return parse_wrk(proc.stdout)


def run_stream(
    url: str,
    keys: list[str],
    body: Path,
    out: Path,
    conc: int,
    duration: float,
    warmup: float = 0.0,
    delay_ms: int = 0,
) -> dict[str, Any]:
    """bench/stream_client.py in its own process: `conc` streams in flight for `duration` s."""
    argv = [
        sys.executable, str(BENCH / "stream_client.py"),
        "--url", url, "--key", ",".join(keys), "--body-file", str(body),
        "--concurrency", str(conc), "--duration", str(duration),
        "--warmup", str(warmup), "--out", str(out),
    ]  # fmt: skip
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    subprocess.run(argv, check=True, timeout=duration + warmup + 120)
    result: dict[str, Any] = json.loads(out.read_text())
    return result

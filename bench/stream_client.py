"""Streaming load client for `make bench` (wrk cannot measure time to first byte).

Keeps `--concurrency` requests in flight for `--duration` seconds, each a streaming POST, and
records per request:

* TTFB -- from sending the request to the first *body* byte (the first SSE event), which is
  what a user of a streaming completion waits for;
* total -- from sending the request to the end of the stream (time to last byte; for the
  gateway this includes settlement, which runs before the stream's terminating chunk).

A request counts as an error when the status is not 2xx, when the stream does not end with
`data: [DONE]`, when it carries an `event: error`, or when the connection fails.

Runs in its own process (bench/run.py starts it) so it never shares an event loop with a server.
It reports its own CPU use (user+sys / wall): near 100 % means the client, not the server under
test, limited the throughput.

Prints one JSON object to stdout (or writes it to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time

import aiohttp

DONE = b"data: [DONE]"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(args: argparse.Namespace, body: bytes) -> dict[str, object]:
    headers = {"content-type": "application/json"}
    keys = itertools.cycle([f"Bearer {k}" for k in args.key.split(",") if k] or [""])
    if args.delay_ms:
        headers["x-mock-delay-ms"] = str(args.delay_ms)
    url = args.url.rstrip("/") + args.path

    ttfb: list[float] = []
    total: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False
    ) as session:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                key = next(keys)
                sent = headers | {"authorization": key} if key else headers
                async with session.post(url, data=body, headers=sent) as resp:
                    first = await resp.content.readany()
                    t1 = time.perf_counter()
                    tail = first[-256:]
                    saw_error = b"event: error" in first
                    while True:
                        chunk = await resp.content.readany()
                        if not chunk:
                            break
                        saw_error = saw_error or b"event: error" in chunk
                        tail = (tail + chunk)[-256:]
                    t2 = time.perf_counter()
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                error(type(exc).__name__)
                return
            if not 200 <= status < 300:
                error(f"http_{status}")
                return
            if saw_error:
                error("sse_error_event")
                return
            if DONE not in tail:
                error("incomplete_stream")
                return
            ttfb.append(t1 - t0)
            total.append(t2 - t0)

        async def worker(deadline: float) -> None:
            while time.perf_counter() < deadline:
                await one()

        if args.warmup > 0:
            w_deadline = time.perf_counter() + args.warmup
            await asyncio.gather(*(worker(w_deadline) for _ in range(args.concurrency)))
            ttfb.clear()
            total.clear()
            errors.clear()

        cpu0, t_start = _cpu(), time.perf_counter()
        deadline = t_start + args.duration
        await asyncio.gather(*(worker(deadline) for _ in range(args.concurrency)))
        wall = time.perf_counter() - t_start
        cpu = _cpu() - cpu0

    return {
        "requests": len(total),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "wall_s": wall,
        "rps": len(total) / wall if wall > 0 else 0.0,
        "client_cpu": cpu / wall if wall > 0 else 0.0,
        "ttfb_s": ttfb,
        "total_s": total,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="streaming load client (TTFB + total per request)")
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--key", default="", help="API key; several, comma-separated: in turn")
    p.add_argument("--body-file", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=0.0, help="seconds run first, not counted")
    p.add_argument("--delay-ms", type=int, default=0, help="x-mock-delay-ms per SSE event")
    p.add_argument("--out", help="write the JSON here instead of stdout")
    args = p.parse_args(argv)
    with open(args.body_file, "rb") as f:
        body = f.read()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(args, body))
    else:
        result = uvloop.run(run(args, body))
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()

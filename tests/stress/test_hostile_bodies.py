"""Hostile bodies against a real `budgetgate serve` process (issue 12, "What it must show" 4;
`make stress` only: STRESS=1).

50 connections at once, each announcing a 10 MB body with a bogus key and pushing it as fast as
the gateway takes it: each gets 401 while its upload is still far from done (the answer comes
after the first megabyte, without waiting for the rest), and the gateway's resident memory
(VmRSS of its process) stays within 30 MB of its idle level, during the attack and after. The
figures are printed. Before issue 12: 40 such bodies took RSS from 264 to 513 MB.

The same with the 10 MB in one header of the request head, before any body and with no key at
all (the server caps a request head at 64 KB: 431); and with a valid key that has no
budget left (xfail: its body is read in full before the admission's 429).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from tests.hostile.raw import read_response
from tests.procs import (
    ADMIN_KEY,
    PRICES,
    UPSTREAM_KEY,
    ManagedProcess,
    base_env,
    budgetgate_bin,
    free_port,
)
from tests.stress.conftest import STRESS, Figures

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(not STRESS, reason="a `make stress` figure (STRESS=1)"),
]

CONNECTIONS = 50
BODY = 10 * 1024 * 1024
FIRST = 1024 * 1024  # sent before the answer is expected
CHUNK = 64 * 1024
RSS_MARGIN_KB = 30 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def hostile_upload(port: int, index: int) -> tuple[int, int, float]:
    """(status, bytes of the body sent when the answer was read, seconds to the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer sk-bg-bogus-{index:04d}-{'x' * 32}\r\n"
        f"content-type: application/json\r\ncontent-length: {BODY}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    writer.write(header)
    sent = 0
    chunk = b"a" * CHUNK
    response = asyncio.create_task(read_response(reader))
    try:
        # The first megabyte, then wait for the answer: it must come with 9 MB still unsent.
        while sent < FIRST:
            writer.write(chunk)
            sent += CHUNK
        await writer.drain()
        r = await asyncio.wait_for(asyncio.shield(response), 20)
        at_answer, seconds = sent, time.monotonic() - started
        # Then keep pushing the rest, as an attacker would, until the gateway hangs up.
        try:
            while sent < BODY:
                writer.write(chunk)
                sent += CHUNK
                await asyncio.wait_for(writer.drain(), 2)
        except (ConnectionError, TimeoutError):
            pass
        return r.status, at_answer, seconds
    finally:
        response.cancel()
        writer.close()


def start_gateway(tmp_path: Path) -> ManagedProcess:
    port = free_port()
    env = base_env() | {
        "BUDGETGATE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
        # Nothing listens there: nothing of these scenarios may be forwarded.
        "BUDGETGATE_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}",
        "BUDGETGATE_ADMIN_KEY": ADMIN_KEY,
        "BUDGETGATE_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "BUDGETGATE_PRICES_FILE": PRICES,
        "BUDGETGATE_LOG_FORMAT": "json",
    }
    gateway = ManagedProcess(
        "gateway-bodies",
        [budgetgate_bin(), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env,
        tmp_path,
        port,
    )
    gateway.start()
    return gateway


async def test_fifty_10_mb_bodies_with_a_bogus_key(tmp_path: Path, figures: Figures) -> None:
    gateway = start_gateway(tmp_path)
    port = gateway.port
    try:
        assert gateway.pid is not None
        # Idle: after a few ordinary requests (a valid key's and bogus keys' small ones).
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            r = await client.post(
                "/admin/keys",
                json={"max_budget": 1.0},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert r.status_code == 201, r.text
            for i in range(20):
                r = await client.post(
                    "/v1/chat/completions",
                    json={"model": "bg-test", "messages": []},
                    headers={"authorization": f"Bearer sk-bg-warm-{i}"},
                )
                assert r.status_code == 401
        await asyncio.sleep(1)
        idle = rss_kb(gateway.pid)

        peak = idle
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kb(gateway.pid))  # type: ignore[arg-type]
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        results = await asyncio.gather(*(hostile_upload(port, i) for i in range(CONNECTIONS)))
        elapsed = time.monotonic() - started
        await asyncio.sleep(1)
        done.set()
        await sampler
        after = rss_kb(gateway.pid)
        assert gateway.alive

        statuses = sorted({s for s, _, _ in results})
        at_answer = max(a for _, a, _ in results)
        slowest = max(t for _, _, t in results)
        figures(
            "50 x 10 MB bodies, bogus key",
            ["connections", "statuses", "max sent at answer (MB)", "slowest answer (s)",
             "elapsed (s)", "RSS idle (MB)", "RSS peak (MB)", "RSS after (MB)"],
            [[CONNECTIONS, statuses, at_answer / 2**20, slowest, elapsed, idle / 1024,
              peak / 1024, after / 1024]],
        )  # fmt: skip
        assert statuses == [401], results
        assert at_answer <= FIRST < BODY
        assert peak - idle <= RSS_MARGIN_KB, (idle, peak)
        assert after - idle <= RSS_MARGIN_KB, (idle, after)
    finally:
        gateway.terminate()


async def oversized_head(port: int) -> tuple[int | str, int]:
    """A request head with one 10 MB header and no key: (status or error, bytes sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: ")
    sent = 0
    chunk = b"a" * CHUNK
    try:
        while sent < BODY:
            writer.write(chunk)
            sent += CHUNK
            await asyncio.wait_for(writer.drain(), 5)
        writer.write(b"\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        r = await asyncio.wait_for(read_response(reader), 20)
        return r.status, sent
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__, sent
    finally:
        writer.close()


async def test_fifty_10_mb_request_heads_without_a_key(tmp_path: Path, figures: Figures) -> None:
    gateway = start_gateway(tmp_path)
    try:
        assert gateway.pid is not None
        await asyncio.sleep(1)
        idle = peak = rss_kb(gateway.pid)
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kb(gateway.pid))  # type: ignore[arg-type]
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(oversized_head(gateway.port) for _ in range(CONNECTIONS)))
        done.set()
        await sampler
        await asyncio.sleep(1)
        after = rss_kb(gateway.pid)
        figures(
            "50 x 10 MB request heads, no key",
            ["connections", "outcomes", "RSS idle (MB)", "RSS peak (MB)", "RSS after (MB)"],
            [[CONNECTIONS, sorted({str(s) for s, _ in results}), idle / 1024, peak / 1024,
              after / 1024]],
        )  # fmt: skip
        assert gateway.alive
        assert peak - idle <= RSS_MARGIN_KB, (idle, peak, results[:3])
    finally:
        gateway.terminate()


async def exhausted_upload(port: int, key: str) -> tuple[int, int]:
    """A 10 MB body pushed in full for an exhausted key: (status, bytes sent at the answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {BODY}\r\n\r\n"
    ).encode()
    # A valid request (JSON may end in whitespace): its 429 is the admission's, not a 400.
    request = b'{"model": "bg-priced", "messages": [], "max_tokens": 1}'
    writer.write(header + request)
    sent = len(request)
    chunk = b" " * CHUNK
    response = asyncio.create_task(read_response(reader))
    try:
        while sent < BODY and not response.done():
            piece = chunk[: BODY - sent]
            writer.write(piece)
            sent += len(piece)
            try:
                await asyncio.wait_for(writer.drain(), 5)
            except (ConnectionError, TimeoutError):
                break
        r = await asyncio.wait_for(response, 30)
        return r.status, sent
    finally:
        response.cancel()
        writer.close()


@pytest.mark.xfail(
    strict=True,
    reason="hole: a key the process has seen, with no budget left, makes the gateway buffer "
    "each connection's whole body (BUDGETGATE_MAX_BODY_BYTES) before the admission's 429 "
    "(app/proxy/service.py _handle: bodies of keys in _known_keys are read before admission): "
    "50 x 10 MB took RSS from 112 to 962 MB, every 429 only after the full 10 MB",
)
async def test_fifty_10_mb_bodies_with_an_exhausted_key(tmp_path: Path, figures: Figures) -> None:
    gateway = start_gateway(tmp_path)
    try:
        assert gateway.pid is not None
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            r = await client.post(
                "/admin/keys",
                json={"max_budget": 0.0},
                headers={"authorization": f"Bearer {ADMIN_KEY}"},
            )
            assert r.status_code == 201, r.text
            key = r.json()["key"]
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "bg-priced", "messages": [], "max_tokens": 1},
                headers={"authorization": f"Bearer {key}"},
            )
            assert r.status_code == 429  # the key is known to the process now
        await asyncio.sleep(1)
        idle = peak = rss_kb(gateway.pid)
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_kb(gateway.pid))  # type: ignore[arg-type]
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(
            *(exhausted_upload(gateway.port, key) for _ in range(CONNECTIONS))
        )
        done.set()
        await sampler
        await asyncio.sleep(1)
        after = rss_kb(gateway.pid)
        at_answer = max(s for _, s in results)
        figures(
            "50 x 10 MB bodies, exhausted key",
            ["connections", "statuses", "max sent at answer (MB)", "RSS idle (MB)",
             "RSS peak (MB)", "RSS after (MB)"],
            [[CONNECTIONS, sorted({s for s, _ in results}), at_answer / 2**20, idle / 1024,
              peak / 1024, after / 1024]],
        )  # fmt: skip
        assert {s for s, _ in results} == {429}, results
        assert peak - idle <= RSS_MARGIN_KB, (idle, peak)
    finally:
        gateway.terminate()

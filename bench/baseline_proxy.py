"""The floor for `make bench`: a bare pass-through proxy with no auth and no ledger.

Same stack and server settings as the gateway (uvicorn with uvloop + httptools, no access log,
log level warning; one long-lived aiohttp ClientSession for the upstream; what startup built
frozen out of the garbage collector's sight), minus everything
budgetgate adds: it forwards the request (method, path, query, headers less hop-by-hop ones,
body) and relays the answer. JSON answers are read whole and returned (as the gateway does for
non-streaming requests); event streams are relayed chunk by chunk.

    python bench/baseline_proxy.py --port 8200 --upstream http://127.0.0.1:9100 [--workers N]
"""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "date", "server"}
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def create_app(upstream_url: str, max_connections: int = 512) -> Starlette:
    base = upstream_url.rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=max_connections, ttl_dns_cache=300
        )
        state["session"] = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=600),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        gc.freeze()  # as the gateway does after its startup (app/main.py)
        try:
            yield
        finally:
            gc.unfreeze()
            await state["session"].close()

    async def relay(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
        finally:
            resp.release()

    async def proxy(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        headers["accept-encoding"] = "identity"
        body = await request.body()
        url = base + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        try:
            resp = await state["session"].request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return Response(b'{"error":"upstream unreachable"}', 502)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _RESPONSE_DROP}
        if resp.content_type == "text/event-stream":
            return StreamingResponse(relay(resp), resp.status, headers=out_headers)
        try:
            content = await resp.read()
        finally:
            resp.release()
        return Response(content, resp.status, headers=out_headers)

    return Starlette(
        routes=[Route("/{path:path}", proxy, methods=METHODS)],
        lifespan=lifespan,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)
    config: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": "warning",
        "access_log": False,
        "loop": "uvloop",
        "http": "httptools",
    }
    if args.workers == 1:
        uvicorn.run(create_app(args.upstream), **config)
        return
    # Several workers: uvicorn imports the app in each (like `budgetgate serve --workers N`).
    os.environ[UPSTREAM_ENV] = args.upstream
    uvicorn.run("baseline_proxy:app_from_env", factory=True, workers=args.workers, **config)


UPSTREAM_ENV = "BASELINE_UPSTREAM_URL"


def app_from_env() -> Starlette:
    return create_app(os.environ[UPSTREAM_ENV])


if __name__ == "__main__":
    main()

"""The one long-lived upstream client (aiohttp: several times httpx's throughput here)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from app.errors import UpstreamTimeout, UpstreamUnreachable

log = logging.getLogger("budgetgate.upstream")

# Transport failures before any answer byte arrived.
_CONNECT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)
# Below the 5 s keep-alive timeout of uvicorn-served upstreams (LiteLLM's default).
UPSTREAM_KEEPALIVE_SECONDS = 3.0


class UpstreamClient:
    def __init__(self, base_url: str, timeout_seconds: float, max_connections: int) -> None:
        self.base_url = base_url
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_connections,
            ttl_dns_cache=300,
            # Drop idle connections before the upstream does: uvicorn (LiteLLM, the mock)
            # closes keep-alive connections idle for 5 s, and aiohttp's default of 15 s
            # reused connections the server was closing at that moment (sporadic 502s).
            keepalive_timeout=UPSTREAM_KEEPALIVE_SECONDS,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self.timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Content-Type", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def reachable(self, seconds: float = 5.0) -> bool:
        """Whether the upstream accepts a connection (a readiness check: nothing is sent, so
        nothing is billed, whatever the upstream is)."""
        parts = urlsplit(self.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, port), seconds
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, method: str, path_qs: str, headers: Mapping[str, str], body: bytes
    ) -> aiohttp.ClientResponse:
        """Sends the request and returns once the answer's headers are in; the caller reads
        (or streams) the body and must release the response. `path_qs` is sent exactly as
        given: not normalised, not re-encoded (the route table judged these very bytes)."""
        assert self._session is not None, "upstream client not started"
        try:
            return await self._session.request(
                method,
                URL(self.base_url + path_qs, encoded=True),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not answer in time") from None
        except _CONNECT_ERRORS as exc:
            log.warning("upstream unreachable: %s", type(exc).__name__)
            raise UpstreamUnreachable("the upstream server could not be reached") from None

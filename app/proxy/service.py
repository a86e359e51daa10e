"""The request path: authenticate -> admit (reserve) -> forward -> settle.

No database session is held across the upstream exchange: admission and settlement are each
one short transaction. Settlement runs in the relay's `finally`, shielded from cancellation, so
every request that was admitted ends in exactly one ledger entry, whatever happens.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any

import aiohttp
import asyncpg
import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from app.alerts.service import AlertService
from app.budgets.hotpath import AdmitRequest, HotLedger
from app.budgets.repository import (
    Admission,
    BudgetRepository,
    ConcurrentChange,
    Outcome,
    RequestInfo,
)
from app.budgets.state import PeriodState
from app.clock import Clock
from app.config import Settings
from app.errors import (
    AppError,
    BadRequest,
    BudgetExceeded,
    Forbidden,
    LedgerUnavailable,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_response,
)
from app.keys.repository import KeyContext
from app.keys.service import KeyService, hash_key
from app.pricing.cost import COST_HEADER, CostCalculator
from app.proxy.charging import body_outcome, stream_outcome, unmetered_outcome
from app.proxy.headers import (
    budget_headers,
    presented_key,
    response_headers,
    retry_after,
    rfc3339,
    upstream_headers,
)
from app.proxy.request import METERED_PATHS, MeteredRequest, api_path, parse_metered
from app.proxy.streaming import RelayResponse, sse_error_event
from app.proxy.upstream import UpstreamClient
from app.proxy.usage import StreamMeter

log = logging.getLogger("budgetgate.proxy")

# Header bytes that cannot be forwarded (see Gateway._check_sendable).
_UNSENDABLE = re.compile(rb"[\r\n\x00]")
# The gateway's own client route (not forwarded either).
CLIENT_ROUTES = frozenset({"/v1/budget"})


# Without the /v1 prefix only the OpenAI API's own paths are forwarded (as LiteLLM serves
# them): the upstream's other routes -- LiteLLM's /key/generate, /config/update, ... -- must not
# be reachable with the gateway's upstream credential.
OPENAI_PATHS = frozenset(
    {
        "chat", "completions", "embeddings", "responses", "messages", "models", "images",
        "audio", "files", "batches", "fine_tuning", "moderations", "assistants", "threads",
        "vector_stores", "rerank", "uploads", "realtime", "engines", "openai",
    }
)  # fmt: skip


def is_proxied(path: str) -> bool:
    """Paths the gateway takes: everything under /v1/ but its own routes, and the OpenAI
    API's paths without /v1. Everything else is the FastAPI app's (and 404s there)."""
    if path.startswith("/v1/"):
        return path not in CLIENT_ROUTES
    return path.split("/", 2)[1] in OPENAI_PATHS


_LEDGER_ERRORS = (
    SQLAlchemyError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A pooled connection reused while the server was shutting it down ("cannot switch to
    # state 12; another operation (2) is in progress"): the ledger is unavailable too.
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    ConcurrentChange,
)


class Gateway:
    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        keys: KeyService,
        budgets: BudgetRepository,
        hot: HotLedger,
        costs: CostCalculator,
        upstream: UpstreamClient,
        alerts: AlertService,
    ) -> None:
        self.hot = hot
        self.alerts = alerts
        self._pending_settlements: set[asyncio.Future[Any]] = set()
        self.settings = settings
        self.clock = clock
        self.keys = keys
        self.budgets = budgets
        self.costs = costs
        self.upstream = upstream
        self.passthrough = settings.key_mode == "passthrough"
        self.upstream_key = (
            settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        )

    async def handle(self, request: Request) -> Response:
        try:
            return await self._handle(request)
        except AppError as exc:
            # Every authenticated response, errors too, carries x-request-id and the budget
            # headers (SPEC 3); a 429 already has them.
            key: KeyContext | None = getattr(request.state, "budget_key", None)
            if key is not None and "x-request-id" not in exc.headers:
                exc.headers.update(await self.headers_now(key, request.state.budget_request_id))
            raise

    async def headers_now(self, key: KeyContext, request_id: str) -> dict[str, str]:
        """x-request-id and the key's budget headers as the ledger has them now (responses
        that did not go through an admission: errors, the free paths, GET /v1/budget)."""
        try:
            states = await self.budgets.period_states([b.period_id for b in key.budgets])
        except _LEDGER_ERRORS:
            states = []
        return budget_headers(states, request_id)

    async def _handle(self, request: Request) -> Response:
        path = request.scope["path"]
        request_id = new_request_id()
        endpoint = api_path(path)
        started = self.clock.now()
        presented = presented_key(request.headers)

        if not presented or (
            request.method == "GET" and (endpoint == "/models" or endpoint.startswith("/models/"))
        ):
            # Free and always allowed (even for an exhausted key): no budget check, no entry.
            key = await self._authenticate(request)
            self._remember(request, key, request_id)
            self._check_sendable(request)
            info = RequestInfo(request_id, key.id, None, endpoint, False, started)
            response = await self._forward_free(request, info, await self._read_body(request))
            response.headers.update(await self.headers_now(key, request_id))
            return response

        try:
            self._check_sendable(request)
            raw = await self._read_body(request)
            metered, amount = self._bound(request.method, endpoint, raw)
        except AppError:
            # A bad key's 401 comes before a bad body's 4xx.
            self._remember(request, await self._authenticate(request), request_id)
            raise
        model = metered.model if metered else None
        stream = bool(metered and metered.stream)

        # Authenticate + admit: one step on the ledger.
        key, admission = await self._admit(
            AdmitRequest(
                hash_key(presented),
                request_id,
                model,
                endpoint,
                stream,
                amount,
                started,
                started + timedelta(seconds=self.settings.reservation_ttl_seconds),
            )
        )
        self._remember(request, key, request_id)
        if admission is None:
            raise Forbidden(
                f"model '{model}' is not allowed for key {key.label}; "
                f"allowed: {', '.join(key.models)}",
                param="model",
            )
        if not admission.admitted:
            raise self._budget_exceeded(key, admission, request_id)
        info = RequestInfo(request_id, key.id, model, endpoint, stream, started)
        return await self._forward(request, info, metered, raw, admission)

    # -- steps -----------------------------------------------------------------------------

    @staticmethod
    def _check_sendable(request: Request) -> None:
        """What cannot be forwarded or recorded is the client's error, found before admission:
        NUL in the path (PostgreSQL text cannot hold it, for the ledger's endpoint), CR, LF or
        NUL in a header (aiohttp refuses to send it; HTTP/1.1 servers never pass one on, but
        other ASGI servers or callers might)."""
        if "\x00" in request.scope["path"]:
            raise BadRequest("the request path must not contain NUL characters")
        for name, value in request.headers.raw:
            if _UNSENDABLE.search(name) or _UNSENDABLE.search(value):
                raise BadRequest("request headers must not contain CR, LF or NUL characters")

    @staticmethod
    def _remember(request: Request, key: KeyContext, request_id: str) -> None:
        request.state.budget_key, request.state.budget_request_id = key, request_id

    def _bound(self, method: str, endpoint: str, raw: bytes) -> tuple[MeteredRequest | None, int]:
        """The metered request and the upper bound of its cost (0 for other paths)."""
        if method != "POST" or endpoint not in METERED_PATHS:
            return None, 0
        metered = parse_metered(endpoint, raw, self.settings)
        return metered, self.costs.bound(metered)

    async def _admit(self, req: AdmitRequest) -> tuple[KeyContext, Admission | None]:
        """The key and its admission; None when the key may not use the requested model."""
        try:
            for _ in range(5):
                result = await self.hot.admit(req, self.clock.now())
                if result.expired_periods:  # the period ended: roll it, then try again
                    await self.budgets.roll_periods(result.expired_periods)
                    continue
                if result.retry:
                    continue
                return self.keys.ensure_usable(result.key), result.admission
            raise ConcurrentChange("periods kept expiring during admission")
        except _LEDGER_ERRORS as exc:
            raise self._ledger_down(exc) from None

    async def _authenticate(self, request: Request) -> KeyContext:
        try:
            return await self.keys.authenticate(presented_key(request.headers))
        except _LEDGER_ERRORS as exc:
            raise self._ledger_down(exc) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body is larger than {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise BadRequest("client disconnected while sending the body") from None
        return b"".join(chunks)

    def _budget_exceeded(
        self, key: KeyContext, admission: Admission, request_id: str
    ) -> BudgetExceeded:
        state = admission.periods[0]
        self.alerts.exhausted_soon(key, state)
        used = state.spend + state.reserved
        resets = (
            f"the period resets at {rfc3339(state.period_end)}"
            if state.period_end is not None
            else "this budget does not reset"
        )
        message = (
            f"Budget exceeded for key {key.label}: spend ${format_dollars_4(used)} + this request "
            f"up to ${format_dollars_4(admission.amount)} would pass max_budget "
            f"${format_dollars_4(state.max_budget or 0)}; {resets}"
        )
        headers = budget_headers([state], request_id) | retry_after(state, self.clock.now())
        return BudgetExceeded(message, headers=headers)

    async def _forward_free(self, request: Request, info: RequestInfo, raw: bytes) -> Response:
        resp = await self._send(request, info, raw)
        try:
            body = await resp.read()
        finally:
            resp.release()
        return Response(body, resp.status, response_headers(list(resp.headers.items())))

    async def _send(
        self, request: Request, info: RequestInfo, body: bytes
    ) -> aiohttp.ClientResponse:
        headers = upstream_headers(
            request.headers, info.request_id, self.upstream_key, self.passthrough
        )
        query = request.scope["query_string"]
        path_qs = request.scope["path"] + (f"?{query.decode('latin-1')}" if query else "")
        return await self.upstream.send(request.method, path_qs, headers, body)

    async def _forward(
        self,
        request: Request,
        info: RequestInfo,
        metered: MeteredRequest | None,
        raw: bytes,
        admission: Admission,
    ) -> Response:
        body = metered.body if metered else raw
        try:
            resp = await self._send(request, info, body)
        except (UpstreamUnreachable, UpstreamTimeout) as exc:
            outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "upstream_error"
            states = await self._settle(info, Outcome(outcome, 0, "none", status_code=exc.status))
            return error_response(exc, budget_headers(states or admission.periods, info.request_id))
        except BaseException as exc:
            # Anything else (a bug, a request aiohttp refuses to send, cancellation): the
            # reservation is released now, not held until the sweeper's TTL.
            failed = isinstance(exc, Exception)
            await self._settle(
                info,
                Outcome(
                    "upstream_error" if failed else "client_disconnect",
                    0,
                    "none",
                    status_code=500 if failed else None,
                ),
            )
            raise

        if resp.status < 400 and (metered is None or metered.stream):
            meter = (
                StreamMeter(drop_usage_chunk=not metered.client_wants_usage) if metered else None
            )
            headers = response_headers(list(resp.headers.items())) | budget_headers(
                admission.periods, info.request_id
            )
            return RelayResponse(
                self._relay(resp, info, metered, meter), resp.status, headers=headers
            )

        try:
            content = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp.release()
            timeout = isinstance(exc, TimeoutError)
            states = await self._settle(
                info,
                Outcome(
                    "timeout" if timeout else "upstream_error",
                    0,
                    "none",
                    status_code=504 if timeout else 502,
                ),
            )
            err: AppError = (
                UpstreamTimeout("the upstream did not answer in time")
                if timeout
                else UpstreamUnreachable("the upstream connection failed")
            )
            return error_response(err, budget_headers(states or admission.periods, info.request_id))
        resp.release()
        result = self._outcome_of_body(resp, metered, content)
        states = await self._settle(info, result)
        headers = response_headers(list(resp.headers.items())) | budget_headers(
            states or admission.periods, info.request_id
        )
        return Response(content, resp.status, headers=headers)

    def _outcome_of_body(
        self, resp: aiohttp.ClientResponse, metered: MeteredRequest | None, content: bytes
    ) -> Outcome:
        header = resp.headers.get(COST_HEADER)
        ok = resp.status < 400
        if metered is None or not ok:
            return unmetered_outcome(
                self.costs, header, "ok" if ok else "upstream_error", resp.status
            )
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            data = None
        return body_outcome(self.costs, metered, header, data, len(content), resp.status)

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
        info: RequestInfo,
        metered: MeteredRequest | None,
        meter: StreamMeter | None,
    ) -> AsyncIterator[bytes]:
        outcome = "ok"
        try:
            async for chunk in resp.content.iter_any():
                out = meter.feed(chunk) if meter else chunk
                if out:
                    yield out
            if meter is not None:
                rest = meter.flush()
                if rest:
                    yield rest
                if not meter.completed:
                    outcome = "upstream_error"
                    yield sse_error_event(
                        "the upstream stream ended early",
                        "upstream_error",
                        "upstream_stream_incomplete",
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            timeout = isinstance(exc, TimeoutError)
            outcome = "timeout" if timeout else "upstream_error"
            log.warning("upstream stream failed: %s", type(exc).__name__)
            yield sse_error_event(
                "the upstream timed out mid-stream" if timeout else "the upstream stream broke",
                "upstream_error",
                "upstream_timeout" if timeout else "upstream_stream_broken",
            )
        except BaseException:
            # A client that leaves after the stream's end marker (the openai SDK closes on
            # [DONE], before the upstream's last bytes) got everything: that is `ok`.
            outcome = "ok" if meter is not None and meter.completed else "client_disconnect"
            raise
        finally:
            resp.close()
            await self._settle(info, self._outcome_of_stream(resp, metered, meter, outcome))

    def _outcome_of_stream(
        self,
        resp: aiohttp.ClientResponse,
        metered: MeteredRequest | None,
        meter: StreamMeter | None,
        outcome: str,
    ) -> Outcome:
        header = resp.headers.get(COST_HEADER)
        if metered is None or meter is None:
            return unmetered_outcome(self.costs, header, outcome, resp.status)
        return stream_outcome(self.costs, metered, header, meter, outcome, resp.status)

    async def _settle(self, info: RequestInfo, outcome: Outcome) -> list[PeriodState] | None:
        """The periods' state after the settlement; None if it did not land (yet).

        The ledger runs it to its end whatever happens to this request (its client left, the
        server shuts down and cancels it): it is awaited shielded, and its outcome is handled
        by _settled, a callback, in either case (the shutdown drains what is still pending)."""
        settling = self.hot.settle_soon(info, outcome, self.clock.now())
        self._pending_settlements.add(settling)
        settling.add_done_callback(functools.partial(self._settled, info, outcome))
        try:
            return await asyncio.shield(settling)
        except _LEDGER_ERRORS:
            return None

    def _settled(
        self,
        info: RequestInfo,
        outcome: Outcome,
        settling: asyncio.Future[list[PeriodState] | None],
    ) -> None:
        self._pending_settlements.discard(settling)
        if settling.cancelled():
            return
        exc = settling.exception()
        if isinstance(exc, _LEDGER_ERRORS):
            # The upstream answered and may have billed: keep trying in the background (the
            # reservation stays held meanwhile, so the budget stays closed for it).
            log.warning(
                "settlement of %s failed (%s); retrying in the background",
                info.request_id,
                type(exc).__name__,
            )
            task = asyncio.ensure_future(self._settle_in_background(info, outcome))
            self._pending_settlements.add(task)
            task.add_done_callback(self._pending_settlements.discard)
        elif exc is not None:
            log.error("settlement of %s failed", info.request_id, exc_info=exc)
        elif settling.result() is None:
            log.warning("request %s was already released by the sweeper", info.request_id)

    async def _settle_in_background(self, info: RequestInfo, outcome: Outcome) -> None:
        """Retry a settlement until the ledger is back, for as long as the reservation lives
        (after that the sweeper has released it and recorded it as abandoned)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.reservation_ttl_seconds
        delay = 0.1
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                settling = self.hot.settle_soon(info, outcome, self.clock.now())
                if await asyncio.shield(settling) is None:
                    log.warning("request %s was already released by the sweeper", info.request_id)
                return
            except _LEDGER_ERRORS:
                continue
        log.error("gave up settling %s; the sweeper releases it", info.request_id)

    async def drain(self, seconds: float) -> None:
        """At shutdown: give settlements still running or retrying a last chance to land."""
        if self._pending_settlements:
            await asyncio.wait(set(self._pending_settlements), timeout=seconds)

    def _ledger_down(self, exc: BaseException) -> LedgerUnavailable:
        log.error("ledger database unavailable: %s", type(exc).__name__)
        return LedgerUnavailable("the budget ledger is unavailable; the request was not forwarded")


# Request ids: "req_" + 32 hex digits: the time in milliseconds, a random number drawn once per
# process (again in a forked child), a counter. Time first, so that the ledger's indexes on
# request ids grow at their end: random ids dirtied a random index page per request in every
# commit (measured: ~30 % of the SQLite ledger's CPU per request, on a 30k-entry ledger).
_process_tag = os.urandom(5).hex()
_request_counter = itertools.count()


def _new_process_tag() -> None:
    global _process_tag
    _process_tag = os.urandom(5).hex()


os.register_at_fork(after_in_child=_new_process_tag)


def new_request_id() -> str:
    count = next(_request_counter) & 0xFF_FFFF_FFFF
    return f"req_{time.time_ns() // 1_000_000:012x}{_process_tag}{count:010x}"


def format_dollars_4(nanos: int) -> str:
    """Dollars to four places for messages (rounded up: never shows less than was used)."""
    return f"{Decimal(nanos).scaleb(-9).quantize(Decimal('0.0001'), rounding=ROUND_CEILING)}"

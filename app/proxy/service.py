"""The request path: authenticate -> admit (reserve) -> forward -> settle.

No database session is held across the upstream exchange: admission and settlement are each
one short transaction. Settlement runs in the relay's `finally`, shielded from cancellation, so
every request that was admitted ends in exactly one ledger entry, whatever happens.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal

import aiohttp
import orjson
from opentelemetry import trace
from opentelemetry.trace import Tracer
from starlette.requests import Request
from starlette.responses import Response

from app.alerts.service import AlertService
from app.body import declares_more_than, is_json_media, read_body, too_large
from app.budgets.state import PeriodState, tightest
from app.clock import Clock
from app.config import Settings
from app.errors import (
    AppError,
    BadRequest,
    BudgetExceeded,
    Forbidden,
    LedgerUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamTimeout,
    UpstreamUnreachable,
    error_response,
)
from app.keys.credentials import presented_key
from app.keys.service import KeyService, hash_key
from app.ledger.contract import (
    LEDGER_ERRORS,
    AdmitRequest,
    Admitted,
    ConcurrentChange,
    HotLedger,
    KeyContext,
    KeyRefused,
    Outcome,
    PeriodsChanged,
    PeriodsExpired,
    Rejected,
    RequestInfo,
    model_allowed,
)
from app.ledger.periods import BudgetRepository
from app.ledger.settlement import Settlement
from app.metrics import LEDGER_SECONDS
from app.pricing.cost import CostCalculator
from app.proxy.access import AccessRecord, current_access
from app.proxy.charging import outcome_of_body, outcome_of_stream
from app.proxy.headers import (
    add_identity,
    budget_headers,
    response_headers,
    retry_after,
    rfc3339,
    upstream_headers,
)
from app.proxy.query import judge_query
from app.proxy.request import MeteredRequest, parse_metered, set_output_bound
from app.proxy.routes import Access, RouteTable, parse_extra_routes
from app.proxy.streaming import RelayResponse, sse_error_event
from app.proxy.upstream import UpstreamClient
from app.proxy.usage import StreamMeter
from app.tracing import start_phase

log = logging.getLogger("budgetgate.proxy")

# Says that shrink to fit lowered the request's output bound, and to what (SPEC 10).
OUTPUT_LIMITED_HEADER = "x-budget-output-tokens-limited"

# Key hashes remembered per process as authenticated (a few MB at most).
KNOWN_KEYS_LIMIT = 100_000

# Header bytes that cannot be forwarded (see Gateway._check_sendable).
_UNSENDABLE = re.compile(rb"[\r\n\x00]")


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
        tracer: Tracer | None = None,
    ) -> None:
        self.hot = hot
        self.tracer = tracer or trace.NoOpTracer()
        self.alerts = alerts
        self.settings = settings
        self.clock = clock
        self.keys = keys
        self.budgets = budgets
        self.costs = costs
        self.upstream = upstream
        self.settlement = Settlement(hot, clock, settings.reservation_ttl_seconds, self.tracer)
        self.routes = RouteTable(parse_extra_routes(settings.extra_routes))
        self.passthrough = settings.key_mode == "passthrough"
        self.upstream_key = (
            settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
        )
        # Hashes of keys that authenticated in this process: only they may make the gateway
        # read a body before the ledger's admission (which checks the key again, atomically).
        # A key that fails there is forgotten, so an unknown key never gets a body buffered.
        # With each, the key's shrink-to-fit choice as last seen (the admission reads it again).
        self._known_keys: dict[str, bool | None] = {}

    async def handle(self, request: Request, record: AccessRecord) -> Response:
        try:
            return await self._handle(request, record)
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
        except LEDGER_ERRORS:
            states = []
        return budget_headers(states, request_id)

    async def _handle(self, request: Request, record: AccessRecord) -> Response:
        scope = request.scope
        request_id = record.request_id
        started = self.clock.now()
        presented = presented_key(request.headers)
        key_hash = hash_key(presented) if presented else ""

        # Who is asking, from the headers alone: nothing is read from an unknown key's body.
        key = None
        if key_hash not in self._known_keys:
            key = await self.authenticate(request)
            self._remember(request, key, request_id)
            self._known_keys[key_hash] = key.shrink_to_fit
            if len(self._known_keys) > KNOWN_KEYS_LIMIT:
                del self._known_keys[next(iter(self._known_keys))]
        try:
            self._check_sendable(request)
            found = self.routes.match(request.method, scope.get("raw_path") or b"")
            query = judge_query(scope["query_string"])
        except AppError:
            if key is None:
                self._remember(request, await self.authenticate(request), request_id)
            raise
        endpoint = found.endpoint
        record.route = found.route.template

        if found.route.access is Access.FREE:
            # Always allowed (an exhausted key too): no budget check, no ledger entry.
            key = key or await self.authenticate(request)
            self._remember(request, key, request_id)
            if found.model is not None and not model_allowed(key.models, found.model):
                raise Forbidden(_not_allowed(key, found.model), param="model")
            info = RequestInfo(request_id, key.id, None, endpoint, False, started)
            response = await self._forward_free(request, info, key.models)
            response.headers.update(await self.headers_now(key, request_id))
            return response

        try:
            if found.route.access is Access.METERED and not is_json_media(
                request.headers.getlist("content-type")
            ):
                raise UnsupportedMediaType(
                    f"{endpoint} takes a JSON body: send 'Content-Type: application/json'"
                )
            raw = await self._read_body(request)
            metered = (
                parse_metered(endpoint, raw, self.settings, found.model)
                if found.route.access is Access.METERED
                else None
            )
            if metered is not None:
                query.check_model(metered.model)
            amount = await self._bound(request, metered)
            record.model, record.reservation = metered.model if metered else None, amount
            record.priced_model = amount > 0
        except AppError:
            # The request's key is reported with its error (headers), and a bad key's 401
            # comes before a bad body's 4xx.
            if getattr(request.state, "budget_key", None) is None:
                self._remember(request, await self.authenticate(request), request_id)
            raise
        model = metered.model if metered else None
        stream = bool(metered and metered.stream)

        # Admit: the key checked again and every budget reserved, in one step on the ledger.
        admitting = time.perf_counter()
        admit_span = start_phase(self.tracer, "admit", record.span)
        try:
            decision = await self._admit(
                request,
                AdmitRequest(
                    key_hash,
                    request_id,
                    model,
                    endpoint,
                    stream,
                    amount,
                    started,
                    started + timedelta(seconds=self.settings.reservation_ttl_seconds),
                    min_amount=self._least_amount(metered, self._known_keys.get(key_hash)),
                ),
            )
        except Unauthorized:
            self._known_keys.pop(key_hash, None)
            raise
        finally:
            admit_span.end()
            LEDGER_SECONDS.labels("admit").observe(time.perf_counter() - admitting)
        key = decision.key
        self._remember(request, key, request_id)
        if isinstance(decision, Rejected):
            raise self._budget_exceeded(decision, request_id)
        admission = decision
        if key_hash in self._known_keys:
            self._known_keys[key_hash] = key.shrink_to_fit
        info = RequestInfo(request_id, key.id, model, endpoint, stream, started)
        limited = None
        if metered is not None and admission.amount < amount:
            if not self._shrinks(key.shrink_to_fit):
                # Shrunk on a choice the key no longer makes: the request is refused after all.
                states = await self._settle(info, Outcome("rejected", 0, "none", status_code=429))
                refusing = tightest(states or admission.periods) or admission.periods[0]
                raise self._budget_exceeded(Rejected(key, refusing, amount), request_id)
            limited = self._shrink_to(metered, admission.amount)
            record.reservation = admission.amount
        response = await self._forward(request, info, metered, raw, admission)
        if limited is not None:
            response.headers[OUTPUT_LIMITED_HEADER] = str(limited)
        return response

    # -- steps -----------------------------------------------------------------------------

    @staticmethod
    def _check_sendable(request: Request) -> None:
        """What cannot be forwarded or recorded is the client's error, found before admission:
        CR, LF or NUL in a header (aiohttp refuses to send it; HTTP/1.1 servers never pass one
        on, but other ASGI servers or callers might)."""
        for name, value in request.headers.raw:
            if _UNSENDABLE.search(name) or _UNSENDABLE.search(value):
                raise BadRequest("request headers must not contain CR, LF or NUL characters")

    @staticmethod
    def _remember(request: Request, key: KeyContext, request_id: str) -> None:
        request.state.budget_key, request.state.budget_request_id = key, request_id
        record = current_access.get()
        if record is not None:
            record.key_id, record.key_alias = key.id, key.alias

    async def _bound(self, request: Request, metered: MeteredRequest | None) -> int:
        """The upper bound of the request's cost (0 for an operator's extra route). A model the
        key may not use is a 403 before its price is looked at: the 400 for an unpriced model
        would tell the client what the gateway can price."""
        if metered is None:
            return 0
        try:
            return self.costs.bound(metered)
        except AppError:
            key = await self.authenticate(request)
            if not model_allowed(key.models, metered.model):
                raise Forbidden(_not_allowed(key, metered.model), param="model") from None
            raise

    def _shrinks(self, key_choice: bool | None) -> bool:
        return self.settings.shrink_to_fit if key_choice is None else key_choice

    def _least_amount(self, metered: MeteredRequest | None, key_choice: bool | None) -> int | None:
        """Shrink to fit: the bound of the request with the smallest output bound it may be
        lowered to; None when it may not be shrunk."""
        least_tokens = self.settings.min_output_tokens
        if (
            not self._shrinks(key_choice)
            or metered is None
            or metered.output_field is None
            or metered.output_bound <= least_tokens
        ):
            return None
        return self.costs.bound_with_output(metered, least_tokens)

    def _shrink_to(self, metered: MeteredRequest, held: int) -> int:
        """Lowers the forwarded output bound to the largest whose cost bound fits what the
        ledger held; returns it."""
        tokens = self.costs.fit_output(metered, held, self.settings.min_output_tokens)
        if tokens is None:  # the ledger held at least the bound at the minimum
            raise RuntimeError("shrink to fit: the held amount does not fit the minimum bound")
        set_output_bound(metered, tokens)
        return tokens

    async def _settle(self, info: RequestInfo, outcome: Outcome) -> list[PeriodState] | None:
        """Settle the request (app.ledger.settlement) and note its outcome in its access record."""
        record = current_access.get()
        if record is not None:
            record.upstream_done()
            record.outcome, record.cost = outcome.outcome, outcome.cost
        return await self.settlement.settle(info, outcome, record.span if record else None)

    async def _admit(self, request: Request, req: AdmitRequest) -> Admitted | Rejected:
        """The ledger's decision on the request: admitted or rejected by a budget; a key that
        may not make it is a 401 (a 403 for a model outside its allow-list)."""
        try:
            for _ in range(5):
                decision = await self.hot.admit(req, self.clock.now())
                match decision:
                    case PeriodsExpired(expired=expired):  # roll the ended periods, ask again
                        await self.budgets.roll_periods(expired)
                    case PeriodsChanged():
                        pass
                    case KeyRefused(key=key, reason="model") if key is not None:
                        self._remember(request, key, req.request_id)
                        raise Forbidden(_not_allowed(key, req.model), param="model")
                    case KeyRefused(key=key, reason=reason):
                        raise self.keys.refused(key, reason)
                    case Admitted() | Rejected():
                        return decision
            raise ConcurrentChange("periods kept expiring during admission")
        except LEDGER_ERRORS as exc:
            raise self._ledger_down(exc) from None

    async def authenticate(self, request: Request) -> KeyContext:
        """The request's key, from its headers: 401 when missing, ambiguous, unknown, revoked
        or expired."""
        try:
            return await self.keys.authenticate(presented_key(request.headers))
        except LEDGER_ERRORS as exc:
            raise self._ledger_down(exc) from None

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        if declares_more_than(request.scope, limit):
            raise too_large(limit)
        return await read_body(request.receive, limit, self.settings.body_timeout_seconds)

    def _budget_exceeded(self, rejected: Rejected, request_id: str) -> BudgetExceeded:
        key, state = rejected.key, rejected.refusing
        self.alerts.exhausted_soon(key, state)
        record = current_access.get()
        if record is not None:
            record.outcome, record.rejected_by = "rejected", "key"
        used = state.spend + state.reserved
        resets = (
            f"the period resets at {rfc3339(state.period_end)}"
            if state.period_end is not None
            else "this budget does not reset"
        )
        message = (
            f"Budget exceeded for key {key.label}: spend ${format_dollars_4(used)} + this request "
            f"up to ${format_dollars_4(rejected.amount)} would pass max_budget "
            f"${format_dollars_4(state.max_budget or 0)}; {resets}"
        )
        headers = budget_headers([state], request_id) | retry_after(state, self.clock.now())
        return BudgetExceeded(message, headers=headers)

    async def _forward_free(
        self, request: Request, info: RequestInfo, allowed: list[str]
    ) -> Response:
        """The model list (or one model), answered by the upstream; a key limited to some
        models sees only those (the upstream's list is every model its credential reaches)."""
        resp = await self._send(request, info, b"")
        try:
            body = await resp.read()
        finally:
            resp.release()
        if allowed and resp.status == 200 and info.endpoint == "/models":
            body = only_models(body, allowed)
        return Response(body, resp.status, response_headers(list(resp.headers.items())))

    async def _send(
        self, request: Request, info: RequestInfo, body: bytes
    ) -> aiohttp.ClientResponse:
        """Forwards exactly the path and query the route table judged, with one credential."""
        scope = request.scope
        client = scope.get("client") or ("", 0)
        headers = upstream_headers(
            request.headers,
            info.request_id,
            presented_key(request.headers) if self.passthrough else self.upstream_key,
            (str(client[0]), scope.get("scheme", "http"), request.headers.get("host", "")),
            json_body=info.model is not None,
        )
        if self.settings.forward_identity:
            add_identity(headers, info.key_id, request.state.budget_key.alias)
        query = scope["query_string"]
        path_qs = scope["raw_path"] + (b"?" + query if query else b"")
        record = current_access.get()
        if record is not None:
            record.upstream_started = time.perf_counter()
            record.upstream_span = start_phase(self.tracer, "upstream", record.span)
        resp = await self.upstream.send(request.method, path_qs.decode("ascii"), headers, body)
        if record is not None:
            record.upstream_status = resp.status
        return resp

    async def _forward(
        self,
        request: Request,
        info: RequestInfo,
        metered: MeteredRequest | None,
        raw: bytes,
        admission: Admitted,
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
        result = outcome_of_body(self.costs, resp, metered, content)
        states = await self._settle(info, result)
        headers = response_headers(list(resp.headers.items())) | budget_headers(
            states or admission.periods, info.request_id
        )
        return Response(content, resp.status, headers=headers)

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
            await self._settle(info, outcome_of_stream(self.costs, resp, metered, meter, outcome))

    def _ledger_down(self, exc: BaseException) -> LedgerUnavailable:
        log.error("ledger database unavailable: %s", type(exc).__name__)
        return LedgerUnavailable("the budget ledger is unavailable; the request was not forwarded")


def only_models(body: bytes, allowed: list[str]) -> bytes:
    """A model list (`{"data": [{"id": ...}, ...]}`) cut to the allowed models; an answer of
    another shape is passed on as it is."""
    try:
        listing = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return body
    keep = set(allowed)
    listing["data"] = [m for m in listing["data"] if isinstance(m, dict) and m.get("id") in keep]
    return orjson.dumps(listing)


def _not_allowed(key: KeyContext, model: str | None) -> str:
    return f"model '{model}' is not allowed for key {key.label}; allowed: {', '.join(key.models)}"


def format_dollars_4(nanos: int) -> str:
    """Dollars to four places for messages (rounded up: never shows less than was used)."""
    return f"{Decimal(nanos).scaleb(-9).quantize(Decimal('0.0001'), rounding=ROUND_CEILING)}"

"""create_app() and its lifespan: engine, services, upstream client, scheduler."""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from app.alerts.service import AlertService
from app.body import declares_more_than, is_json_media, read_body, replay, too_large
from app.clock import Clock, SystemClock
from app.config import Settings, get_settings
from app.db import create_engine
from app.errors import (
    AppError,
    Unauthorized,
    UnsupportedMediaType,
    error_response,
    install_error_handlers,
)
from app.keys.router import check_admin_key
from app.keys.router import router as admin_router
from app.keys.schemas import ErrorResponse
from app.keys.service import KeyService
from app.ledger import repository as ledger
from app.ledger.contract import create_hot_ledger
from app.ledger.periods import BudgetRepository
from app.logs import configure_logging
from app.metrics import RESERVATIONS_OPEN, metrics_page
from app.migrate import schema_is_current, upgrade_to_head
from app.pricing.cost import CostCalculator
from app.pricing.prices import PriceBook
from app.proxy.asgi import ProxyApp
from app.proxy.request_ids import new_request_id
from app.proxy.service import Gateway
from app.proxy.upstream import UpstreamClient
from app.scheduler import start_scheduler
from app.server import MAX_HEAD_BYTES, head_too_large
from app.tracing import create_tracer_provider, tracer_of

log = logging.getLogger("budgetgate")


def not_ready(message: str, code: str) -> Response:
    return error_response(AppError(message, status=503, type="service_unavailable", code=code))


class SchemaOutdated(RuntimeError):
    pass


async def prepare_schema(settings: Settings, engine: Any) -> None:
    """SQLite (embedded) and BUDGETGATE_AUTO_MIGRATE: migrate on start. Otherwise refuse to
    serve on an outdated schema: migrations are a deploy step (`budgetgate migrate`)."""
    if settings.is_sqlite or settings.auto_migrate:
        await asyncio.to_thread(upgrade_to_head, settings.database_url)
    elif not await schema_is_current(engine, settings.database_url):
        raise SchemaOutdated(
            "the ledger database schema is not at the latest migration: run `budgetgate migrate` "
            "(or set BUDGETGATE_AUTO_MIGRATE=true) before `budgetgate serve`"
        )


def create_app(
    settings: Settings | None = None,
    clock: Clock | None = None,
    *,
    run_scheduler: bool = True,
    migrate: bool = True,
    tracer_provider: TracerProvider | None = None,
) -> BudgetGateApp:
    settings = settings or get_settings()
    clock = clock or SystemClock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings)
        if settings.reservation_ttl_seconds <= settings.upstream_timeout_seconds:
            log.warning(
                "BUDGETGATE_RESERVATION_TTL_SECONDS (%s) is not above "
                "BUDGETGATE_UPSTREAM_TIMEOUT_SECONDS (%s): the sweeper may release a request "
                "that is still running, which is then not charged",
                settings.reservation_ttl_seconds,
                settings.upstream_timeout_seconds,
            )
        engine = create_engine(settings)
        if migrate:
            await prepare_schema(settings, engine)
        budgets = BudgetRepository(engine, clock, settings.reservation_ttl_seconds)
        keys = KeyService(engine, budgets, settings)
        upstream = UpstreamClient(
            settings.upstream_url,
            settings.upstream_timeout_seconds,
            settings.upstream_max_connections,
        )
        await upstream.start()
        costs = CostCalculator(
            PriceBook.load(settings.prices_file),
            settings.unpriced_model,
            settings.trust_upstream_cost,
        )
        app.state.engine = engine
        app.state.budgets = budgets
        app.state.key_service = keys
        hot = create_hot_ledger(settings)
        alerts = AlertService.from_settings(engine, clock, settings)
        app.state.alerts = alerts
        provider = tracer_provider or create_tracer_provider(settings)
        app.state.gateway = Gateway(
            settings, clock, keys, budgets, hot, costs, upstream, alerts, tracer_of(provider)
        )
        scheduler = (
            start_scheduler(budgets, alerts, settings.reset_interval_seconds)
            if run_scheduler
            else None
        )
        # What startup built lives as long as the process: out of the collector's sight. Under
        # load a full collection walked all of it (modules, schemas, prices): ~0.12 s every few
        # seconds, ~4 % of the CPU, and a pause for every request in flight. (No gc.collect()
        # first: startup leaves little garbage, and a full pass costs ~0.2 s in a big heap such
        # as the test suite's, which starts hundreds of gateways.)
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            if scheduler is not None:
                scheduler.shutdown(wait=False)
            await app.state.gateway.settlement.drain(seconds=10)
            await alerts.close()
            await upstream.close()
            await hot.close()
            await engine.dispose()
            if provider is not None and tracer_provider is None:
                provider.shutdown()  # flushes the spans still batched

    app = FastAPI(
        title="budgetgate",
        version="0.1.0",
        description="Budget-enforcing reverse proxy for OpenAI-compatible LLM APIs",
        lifespan=lifespan,
        # `curl -d '{...}'` sends form content-type: read admin bodies as JSON regardless.
        strict_content_type=False,
        max_body_size=settings.max_body_bytes,  # admin bodies too (413)
    )
    app.state.settings = settings
    app.state.clock = clock
    install_error_handlers(app)
    app.include_router(admin_router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={
            503: {
                "model": ErrorResponse,
                "description": "Ledger database (or, when checked, the upstream) unreachable",
            }
        },
    )
    async def readyz(request: Request) -> Response:
        try:
            async with request.app.state.engine.connect() as conn:
                await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=5)
        except Exception as exc:
            log.warning("readiness check failed: %s", type(exc).__name__)
            return not_ready("the ledger database is unreachable", "ledger_unavailable")
        gateway: Gateway = request.app.state.gateway
        if settings.ready_checks_upstream and not await gateway.upstream.reachable():
            log.warning("readiness check failed: the upstream is unreachable")
            return not_ready("the upstream is unreachable", "upstream_unreachable")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        token = settings.metrics_token
        if token is not None:
            presented = request.headers.get("authorization", "")
            expected = f"Bearer {token.get_secret_value()}"
            if not hmac.compare_digest(presented.encode(), expected.encode()):
                raise Unauthorized("missing or wrong metrics token", code="invalid_metrics_token")
        engine = request.app.state.engine
        budgets = None
        try:
            RESERVATIONS_OPEN.set(await ledger.count_open_reservations(engine))
            if settings.metrics_budget_gauges:
                budgets = await ledger.open_budgets(engine)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("metrics: ledger unreachable (%s)", type(exc).__name__)
        body, content_type = metrics_page(budgets)
        return Response(body, media_type=content_type)

    @app.get(
        "/v1/budget",
        tags=["client"],
        responses={
            401: {
                "model": ErrorResponse,
                "description": "Missing, unknown, revoked or expired key",
            },
            503: {"model": ErrorResponse, "description": "Ledger database unreachable"},
        },
    )
    async def my_budget(request: Request) -> JSONResponse:
        """The calling key's budgets, spend, remaining and reset times."""
        keys: KeyService = request.app.state.key_service
        gateway: Gateway = request.app.state.gateway
        ctx = await gateway.authenticate(request)
        out = await keys.get(ctx.id)
        primary = out.model_dump(
            mode="json",
            include={
                "max_budget",
                "budget_duration",
                "soft_budget",
                "budget_timezone",
                "budget_anchor",
                "spend",
                "reserved",
                "remaining",
                "period_start",
                "reset_at",
            },
        )
        budgets = [primary] + [
            b.model_dump(mode="json", exclude={"budget_id"}) for b in out.budgets or []
        ]
        return JSONResponse(
            {"key_prefix": out.key_prefix, "alias": out.alias, "budgets": budgets},
            headers=await gateway.headers_now(ctx, new_request_id()),
        )

    return BudgetGateApp(app)


# The gateway's own routes (FastAPI); every other path is the proxy's, which forwards only what
# its route table names (app/proxy/routes.py) and answers 404 to the rest.
LOCAL_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/openapi.json", "/v1/budget"}
)  # fmt: skip


def is_local(path: str) -> bool:
    return path in LOCAL_PATHS or path == "/admin" or path.startswith("/admin/")


class BudgetGateApp:
    """The ASGI entry point: the gateway's own routes -- the admin API, health, docs, metrics,
    the lifespan -- are the FastAPI app's; every other path is the proxy's (attributes such as
    `state` are the FastAPI app's)."""

    def __init__(self, api: FastAPI) -> None:
        self.api = api
        self.proxy = ProxyApp(lambda: api.state.gateway)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _head_size(scope) > MAX_HEAD_BYTES:
            # The server cuts off a head that is still arriving past this size (app/server.py);
            # one that arrived whole in a single read is refused here.
            await error_response(head_too_large())(scope, receive, send)
            return
        if scope["type"] == "http" and not is_local(scope["path"]):
            await self.proxy(scope, receive, send)
            return
        if scope["type"] == "http":
            try:
                receive = await self._checked_body(scope, receive)
            except AppError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.api(scope, receive, send)

    async def _checked_body(self, scope: Scope, receive: Receive) -> Receive:
        """The gateway's own routes get their body read here, after the checks that need no
        body, under the same size and time limits as proxied requests."""
        refusal = self._refuse_before_body(scope)
        if refusal is not None:
            raise refusal
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        settings = self.api.state.settings
        body = await read_body(receive, settings.max_body_bytes, settings.body_timeout_seconds)
        return replay(body, receive)

    def _refuse_before_body(self, scope: Scope) -> AppError | None:
        """What FastAPI would only find after reading the body: a body declared too large, and
        an admin request without the admin key (its body is never read)."""
        settings = self.api.state.settings
        if declares_more_than(scope, settings.max_body_bytes):
            return too_large(settings.max_body_bytes)
        if is_local(scope["path"]) and scope["path"].startswith("/admin"):
            headers = Headers(scope=scope)
            try:
                check_admin_key(headers, settings)
            except AppError as exc:
                return exc
            writes = scope["method"] in ("POST", "PUT", "PATCH")
            if writes and not is_json_media(headers.getlist("content-type")):
                # A form is never read as JSON: a browser can send one cross-site without asking.
                return UnsupportedMediaType(
                    "admin request bodies are JSON: send 'Content-Type: application/json'"
                )
        return None


def _head_size(scope: Scope) -> int:
    size = len(scope.get("raw_path") or b"") + len(scope["query_string"])
    for name, value in scope["headers"]:
        size += len(name) + len(value)
    return size

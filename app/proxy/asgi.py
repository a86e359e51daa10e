"""The proxy as a bare ASGI app, beside the FastAPI app that serves the gateway's own routes:
FastAPI's routing and middleware would cost the request path a good part of its CPU, and the
proxy needs none of it. Every failure becomes an OpenAI error body; every request gets one
access line."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.errors import AppError, error_response, internal_error
from app.logs import current_request_id
from app.proxy.access import AccessRecord, current_access, finish
from app.proxy.request_ids import new_request_id
from app.proxy.service import Gateway
from app.tracing import start_request

log = logging.getLogger("budgetgate.proxy")


class ProxyApp:
    def __init__(self, gateway: Callable[[], Gateway]) -> None:
        self._gateway = gateway  # built in the lifespan, after this app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self._gateway()
        record = AccessRecord(new_request_id(), scope["method"])
        record.span = start_request(gateway.tracer, scope["method"], record.request_id)
        request_token = current_request_id.set(record.request_id)
        access_token = current_access.set(record)
        response: Response | None = None
        try:
            request = Request(scope, receive)
            try:
                response = await gateway.handle(request, record)
            except AppError as exc:
                response = error_response(exc)
            except Exception as exc:
                log.exception("unhandled error", exc_info=exc)
                response = error_response(internal_error())
            await response(scope, receive, send)
        finally:
            finish(record, response.status_code if response is not None else 500)
            current_access.reset(access_token)
            current_request_id.reset(request_token)

"""One exception type for every failure a client can see, rendered in the OpenAI error format."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("budgetgate")


class AppError(Exception):
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})


class BadRequest(AppError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(AppError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(AppError):
    status, type, code = 403, "permission_error", "model_not_allowed"


class NotFound(AppError):
    status, type, code = 404, "not_found_error", "not_found"


class RequestTimeout(AppError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(AppError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedMediaType(AppError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class InvalidField(AppError):
    status, type, code = 422, "invalid_request_error", "invalid_value"


class BudgetExceeded(AppError):
    status, type, code = 429, "budget_exceeded", "budget_exceeded"


class ParallelLimitExceeded(AppError):
    status, type, code = 429, "parallel_limit_exceeded", "parallel_limit_exceeded"


class UpstreamUnreachable(AppError):
    status, type, code = 502, "upstream_error", "upstream_unreachable"


class LedgerUnavailable(AppError):
    status, type, code = 503, "service_unavailable", "ledger_unavailable"


class AdminDisabled(AppError):
    status, type, code = 503, "service_unavailable", "admin_disabled"


class UpstreamTimeout(AppError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(BaseModel):
    """The body of every error, on every route: the OpenAI error format (SPEC 7). The
    OpenAPI schema documents it; `error_body` writes it."""

    error: ErrorDetail


def internal_error() -> AppError:
    """What a client sees of a bug: no detail (that goes to the log)."""
    return AppError("internal error", status=500, type="server_error", code="internal_error")


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type, "code": code, "param": param}})


def error_response(exc: AppError, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = dict(exc.headers)
    if extra_headers:
        headers.update(extra_headers)
    return Response(
        error_body(exc.message, exc.type, exc.code, exc.param),
        status_code=exc.status,
        headers=headers,
        media_type="application/json",
    )


_HTTP_ERRORS: dict[int, type[AppError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_field: str | None = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        first_field = first_field or field
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON", None
        parts.append(f"{field}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts), first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        message, field = _validation_message(exc)
        if field is None:
            return error_response(BadRequest(message, code="invalid_json"))
        return error_response(InvalidField(message, param=field))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(SQLAlchemyTimeoutError)
    @app.exception_handler(OSError)
    async def _ledger_down(_request: Request, exc: Exception) -> Response:
        # The ledger database is unreachable (on admin and client-info routes; the proxy path
        # maps these itself): 503, fail closed, never a stack trace.
        log.error("ledger database unavailable: %s", type(exc).__name__)
        return error_response(LedgerUnavailable("the budget ledger database is unavailable"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        cls = _HTTP_ERRORS.get(exc.status_code, AppError)
        err = cls(str(exc.detail), status=exc.status_code)
        if exc.status_code == 405:
            err.code = "method_not_allowed"
        return error_response(err, exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(internal_error())

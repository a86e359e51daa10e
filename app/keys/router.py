"""Admin API (SPEC 7): thin routes over KeyService and the ledger readers."""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from app.clock import as_utc
from app.config import Settings
from app.errors import AdminDisabled, InvalidField, Unauthorized
from app.keys.credentials import presented_key
from app.keys.schemas import (
    ErrorResponse,
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyUpdate,
    PeriodList,
)
from app.keys.service import KeyService, dollars
from app.ledger import repository as ledger


def require_admin(request: Request) -> None:
    check_admin_key(request.headers, request.app.state.settings)


def check_admin_key(headers: Headers, settings: Settings) -> None:
    """The admin key, from the headers alone (also checked before an admin body is read)."""
    if settings.admin_key is None:
        raise AdminDisabled(
            "the admin API is disabled: set BUDGETGATE_ADMIN_KEY to a secret and send it as "
            "'Authorization: Bearer <admin key>'"
        )
    try:
        presented = presented_key(headers) or ""
    except Unauthorized:
        presented = ""
    expected = settings.admin_key.get_secret_value()
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Unauthorized("missing or wrong admin key", code="invalid_admin_key")


def reject_nul(request: Request) -> None:
    """No id, alias, cursor or time holds a NUL character, and PostgreSQL text cannot: one in
    the path or query is an invalid value (422), not a database error (500)."""
    for name, value in [*request.path_params.items(), *request.query_params.multi_items()]:
        if "\x00" in str(value):
            raise InvalidField(f"{name}: must not contain NUL characters", param=name)


def key_service(request: Request) -> KeyService:
    return request.app.state.key_service  # type: ignore[no-any-return]


Keys = Annotated[KeyService, Depends(key_service)]
# Documented error statuses (OpenAI error body), so the OpenAPI schema matches what is served.
_ERROR = {"model": ErrorResponse}
_BAD_JSON: dict[int | str, dict[str, Any]] = {400: {**_ERROR, "description": "Malformed JSON"}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {**_ERROR, "description": "Unknown id"}}
# strict_content_type=False: `curl -d '{...}'` (form content-type) is read as JSON too.
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin), Depends(reject_nul)],
    strict_content_type=False,
    responses={
        401: {**_ERROR, "description": "Missing or wrong admin key"},
        422: {**_ERROR, "description": "Invalid field (the message names it)"},
        503: {**_ERROR, "description": "Admin API disabled, or ledger database unreachable"},
    },
)


@router.post("/keys", status_code=201, response_model=KeyCreated, responses=_BAD_JSON)
async def create_key(body: KeyCreate, keys: Keys) -> KeyCreated:
    return await keys.create(body)


@router.get("/keys", response_model=KeyList)
async def list_keys(
    keys: Keys,
    alias: str | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> KeyList:
    data, next_cursor = await keys.list_keys(alias, cursor, limit)
    return KeyList(data=data, next_cursor=next_cursor)


@router.get("/keys/{key_id}", response_model=KeyOut, responses=_NOT_FOUND)
async def get_key(key_id: str, keys: Keys) -> KeyOut:
    return await keys.get(key_id)


@router.patch("/keys/{key_id}", response_model=KeyOut, responses=_BAD_JSON | _NOT_FOUND)
async def update_key(key_id: str, body: KeyUpdate, keys: Keys) -> KeyOut:
    return await keys.update(key_id, body)


@router.delete("/keys/{key_id}", response_model=KeyOut, responses=_NOT_FOUND)
async def revoke_key(key_id: str, keys: Keys) -> KeyOut:
    return await keys.revoke(key_id)


@router.post("/keys/{key_id}/reset", response_model=KeyOut, responses=_NOT_FOUND)
async def reset_key(key_id: str, keys: Keys) -> KeyOut:
    return await keys.reset(key_id)


@router.get("/keys/{key_id}/periods", response_model=PeriodList, responses=_NOT_FOUND)
async def key_periods(
    key_id: str, keys: Keys, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> PeriodList:
    return PeriodList(data=await keys.periods(key_id, limit))


@router.get("/ledger")
async def ledger_entries(
    request: Request,
    key_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    rows, next_cursor = await ledger.list_entries(
        request.app.state.engine, key_id, as_utc(since), as_utc(until), limit, cursor
    )
    data = [
        {
            "request_id": r.request_id,
            "key_id": r.key_id,
            "model": r.model,
            "endpoint": r.endpoint,
            "stream": r.stream,
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "cost": dollars(r.cost),
            "overrun": dollars(r.overrun),
            "cost_source": r.cost_source,
            "outcome": r.outcome,
            "status_code": r.status_code,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
        }
        for r in rows
    ]
    return {"data": data, "next_cursor": next_cursor}


@router.get("/usage")
async def usage_report(
    request: Request,
    group_by: Literal["key", "model", "day"] = "key",
    since: datetime | None = None,
    until: datetime | None = None,
) -> JSONResponse:
    rows = await ledger.usage(request.app.state.engine, group_by, as_utc(since), as_utc(until))
    total = sum(r["cost_nanos"] for r in rows)
    for r in rows:
        r["spend"] = dollars(r.pop("cost_nanos"))
    return JSONResponse({"group_by": group_by, "data": rows, "total_spend": dollars(total)})

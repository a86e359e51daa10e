"""Admin API for teams, users, end users and tags (SPEC 11): the routes of keys, one set per
kind, thin over OwnerService."""

# No `from __future__ import annotations`: the routes are built per kind in `_owner_routes`,
# and FastAPI reads their body and response types from the (local) annotations themselves.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from app.errors import ErrorResponse
from app.keys.router import admin_router_options
from app.keys.schemas import PeriodList
from app.owners.schemas import (
    EndUserCreate,
    EndUserList,
    EndUserOut,
    EndUserUpdate,
    OwnerCreate,
    OwnerOut,
    OwnerUpdate,
    TagCreate,
    TagList,
    TagOut,
    TagUpdate,
    TeamCreate,
    TeamList,
    TeamOut,
    TeamUpdate,
    UserCreate,
    UserList,
    UserOut,
    UserUpdate,
)
from app.owners.service import OwnerService, end_user_scope


def owner_service(request: Request) -> OwnerService:
    return request.app.state.owner_service  # type: ignore[no-any-return]


Owners = Annotated[OwnerService, Depends(owner_service)]
Limit = Annotated[int, Query(ge=1, le=500)]
router = APIRouter(**admin_router_options())
_ERROR = {"model": ErrorResponse}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {**_ERROR, "description": "Unknown id"}}
_BAD_JSON: dict[int | str, dict[str, Any]] = {400: {**_ERROR, "description": "Malformed JSON"}}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {**_ERROR, "description": "Name taken, owner deleted, or a team/user with active keys"}
}


def _owner_routes(
    path: str,
    kind: str,
    create_body: type[OwnerCreate],
    update_body: type[OwnerUpdate],
    out: type[OwnerOut],
) -> None:
    """POST, GET (list and one), PATCH, DELETE, /reset and /periods for one kind of owner."""
    one = f"/{path}/{{owner_id}}"
    shared: dict[str, Any] = {"response_model": out, "tags": [f"admin: {path}"]}
    known = {**shared, "responses": _NOT_FOUND | _CONFLICT}

    @router.post(f"/{path}", status_code=201, responses=_BAD_JSON | _CONFLICT, **shared)
    async def create(body: create_body, owners: Owners) -> Any:  # type: ignore[valid-type]
        return await owners.create(kind, body)

    @router.get(one, **known)
    async def get(owner_id: str, owners: Owners) -> Any:
        return await owners.get(kind, owner_id)

    @router.patch(one, **known | {"responses": known["responses"] | _BAD_JSON})
    async def update(owner_id: str, body: update_body, owners: Owners) -> Any:  # type: ignore[valid-type]
        return await owners.update(kind, owner_id, body)

    @router.delete(one, **known)
    async def delete(owner_id: str, owners: Owners) -> Any:
        return await owners.delete(kind, owner_id)

    @router.post(f"{one}/reset", **known)
    async def reset(owner_id: str, owners: Owners) -> Any:
        return await owners.reset(kind, owner_id)

    @router.get(
        f"{one}/periods", response_model=PeriodList, responses=_NOT_FOUND, tags=shared["tags"]
    )
    async def periods(
        owner_id: str, owners: Owners, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> PeriodList:
        return PeriodList(data=await owners.periods(kind, owner_id, limit))


def _list_route(path: str, kind: str, name_param: str, page: type[Any]) -> None:
    """GET /admin/<path>: the owners of a kind, by id, filtered by name (`alias` or `name`)."""

    @router.get(f"/{path}", response_model=page, tags=[f"admin: {path}"])
    async def list_owners(
        owners: Owners,
        name: Annotated[str | None, Query(alias=name_param)] = None,
        cursor: str | None = None,
        limit: Limit = 100,
    ) -> Any:
        data, next_cursor = await owners.list_owners(kind, cursor, limit, name=name)
        return page(data=data, next_cursor=next_cursor)


@router.get("/end-users", response_model=EndUserList, tags=["admin: end-users"])
async def list_end_users(
    owners: Owners,
    user: str | None = None,
    team_id: str | None = None,
    key_id: str | None = None,
    cursor: str | None = None,
    limit: Limit = 100,
) -> EndUserList:
    scope = end_user_scope(team_id, key_id) if team_id or key_id else None
    data, next_cursor = await owners.list_owners("end_user", cursor, limit, name=user, scope=scope)
    return EndUserList(data=data, next_cursor=next_cursor)  # type: ignore[arg-type]


_list_route("teams", "team", "alias", TeamList)
_list_route("users", "user", "alias", UserList)
_list_route("tags", "tag", "name", TagList)
_owner_routes("teams", "team", TeamCreate, TeamUpdate, TeamOut)
_owner_routes("users", "user", UserCreate, UserUpdate, UserOut)
_owner_routes("end-users", "end_user", EndUserCreate, EndUserUpdate, EndUserOut)
_owner_routes("tags", "tag", TagCreate, TagUpdate, TagOut)

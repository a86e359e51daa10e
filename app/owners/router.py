"""Admin API for teams, users, end users and tags (SPEC 11): the routes of keys, one set per
kind, thin over OwnerService."""

# No `from __future__ import annotations`: the routes are built per kind in `_owner_routes`,
# and FastAPI reads their body and response types from the (local) annotations themselves.

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from app.keys.router import admin_router_options
from app.keys.schemas import ErrorResponse, PeriodList
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
    tag = f"admin: {path}"

    @router.post(f"/{path}", status_code=201, response_model=out, responses=_CONFLICT, tags=[tag])
    async def create(body: create_body, owners: Owners) -> Any:  # type: ignore[valid-type]
        return await owners.create(kind, body)

    @router.get(f"/{path}/{{owner_id}}", response_model=out, responses=_NOT_FOUND, tags=[tag])
    async def get(owner_id: str, owners: Owners) -> Any:
        return await owners.get(kind, owner_id)

    @router.patch(
        f"/{path}/{{owner_id}}",
        response_model=out,
        responses=_NOT_FOUND | _CONFLICT,
        tags=[tag],
    )
    async def update(owner_id: str, body: update_body, owners: Owners) -> Any:  # type: ignore[valid-type]
        return await owners.update(kind, owner_id, body)

    @router.delete(
        f"/{path}/{{owner_id}}", response_model=out, responses=_NOT_FOUND | _CONFLICT, tags=[tag]
    )
    async def delete(owner_id: str, owners: Owners) -> Any:
        return await owners.delete(kind, owner_id)

    @router.post(
        f"/{path}/{{owner_id}}/reset",
        response_model=out,
        responses=_NOT_FOUND | _CONFLICT,
        tags=[tag],
    )
    async def reset(owner_id: str, owners: Owners) -> Any:
        return await owners.reset(kind, owner_id)

    @router.get(
        f"/{path}/{{owner_id}}/periods", response_model=PeriodList, responses=_NOT_FOUND, tags=[tag]
    )
    async def periods(
        owner_id: str, owners: Owners, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> PeriodList:
        return PeriodList(data=await owners.periods(kind, owner_id, limit))


# The listings differ by their filters, so each kind's is written out.


@router.get("/teams", response_model=TeamList, tags=["admin: teams"])
async def list_teams(
    owners: Owners, alias: str | None = None, cursor: str | None = None, limit: Limit = 100
) -> TeamList:
    data, next_cursor = await owners.list_owners("team", cursor, limit, name=alias)
    return TeamList(data=data, next_cursor=next_cursor)  # type: ignore[arg-type]


@router.get("/users", response_model=UserList, tags=["admin: users"])
async def list_users(
    owners: Owners, alias: str | None = None, cursor: str | None = None, limit: Limit = 100
) -> UserList:
    data, next_cursor = await owners.list_owners("user", cursor, limit, name=alias)
    return UserList(data=data, next_cursor=next_cursor)  # type: ignore[arg-type]


@router.get("/tags", response_model=TagList, tags=["admin: tags"])
async def list_tags(
    owners: Owners, name: str | None = None, cursor: str | None = None, limit: Limit = 100
) -> TagList:
    data, next_cursor = await owners.list_owners("tag", cursor, limit, name=name)
    return TagList(data=data, next_cursor=next_cursor)  # type: ignore[arg-type]


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


_owner_routes("teams", "team", TeamCreate, TeamUpdate, TeamOut)
_owner_routes("users", "user", UserCreate, UserUpdate, UserOut)
_owner_routes("end-users", "end_user", EndUserCreate, EndUserUpdate, EndUserOut)
_owner_routes("tags", "tag", TagCreate, TagUpdate, TagOut)

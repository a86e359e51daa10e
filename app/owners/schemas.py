"""Admin API bodies for teams, users, end users and tags: the key's shapes (SPEC 7, 11)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from app.keys.schemas import (
    BudgetEntry,
    BudgetOut,
    Budgets,
    BudgetSettings,
    BudgetUpdate,
    EndUserTemplate,
    OwnerId,
    ParallelLimit,
    _storable,
)

Name = Field(min_length=1, max_length=255)


class OwnerCreate(BudgetSettings):
    """The flat fields are the primary budget (dollars); `budgets` are extra windows."""

    metadata: dict[str, Any] = Field(default_factory=dict)
    budgets: list[BudgetEntry] = Budgets

    _storable = field_validator("metadata")(_storable)


class TeamCreate(OwnerCreate):
    alias: str = Name
    max_parallel_requests: ParallelLimit = None
    end_user_budget: EndUserTemplate = None

    _name = field_validator("alias")(_storable)


class UserCreate(OwnerCreate):
    alias: str = Name

    _name = field_validator("alias")(_storable)


class TagCreate(OwnerCreate):
    name: str = Name

    _name = field_validator("name")(_storable)


class EndUserCreate(OwnerCreate):
    """An end user set up by an admin (its budgets explicit); `team_id` or `key_id` is its
    scope, as the gateway would see it."""

    user: str = Name
    team_id: OwnerId = None
    key_id: OwnerId = None

    _name = field_validator("user", "team_id", "key_id")(_storable)

    @model_validator(mode="after")
    def _one_scope(self) -> EndUserCreate:
        if (self.team_id is None) == (self.key_id is None):
            raise ValueError("team_id or key_id: give exactly one (the end user's scope)")
        return self


class OwnerUpdate(BudgetUpdate):
    """Any subset of an owner's settings; fields not sent are left as they are. `budgets`
    replaces the extra windows (the old ones are retired, with their history)."""

    metadata: dict[str, Any] | None = None
    budgets: list[BudgetEntry] | None = Field(default=None, max_length=20)

    _storable = field_validator("metadata")(_storable)


class TeamUpdate(OwnerUpdate):
    alias: str | None = Field(default=None, min_length=1, max_length=255)
    max_parallel_requests: ParallelLimit = None
    end_user_budget: EndUserTemplate = None

    _name = field_validator("alias")(_storable)


class UserUpdate(OwnerUpdate):
    alias: str | None = Field(default=None, min_length=1, max_length=255)

    _name = field_validator("alias")(_storable)


class TagUpdate(OwnerUpdate):
    pass


class EndUserUpdate(OwnerUpdate):
    pass


class OwnerOut(BaseModel):
    """An owner with its primary budget's current period, flat (like a key); extra windows
    under `budgets`. An end user first seen without a template has no budget: the budget
    fields are null and spend 0."""

    id: str
    max_budget: float | None = None
    budget_duration: str | None = None
    soft_budget: float | None = None
    budget_timezone: str | None = None
    budget_anchor: datetime | None = None
    alert_at: list[float]
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    spend: float
    reserved: float
    remaining: float | None = None
    period_start: datetime | None = None
    reset_at: datetime | None = None
    budgets: list[BudgetOut] | None = None


class TeamOut(OwnerOut):
    alias: str
    max_parallel_requests: int | None = None
    end_user_budget: list[dict[str, Any]] | None = None


class UserOut(OwnerOut):
    alias: str


class TagOut(OwnerOut):
    name: str


class EndUserOut(OwnerOut):
    user: str
    team_id: str | None
    key_id: str | None


class TeamList(BaseModel):
    data: list[TeamOut]
    next_cursor: str | None


class UserList(BaseModel):
    data: list[UserOut]
    next_cursor: str | None


class TagList(BaseModel):
    data: list[TagOut]
    next_cursor: str | None


class EndUserList(BaseModel):
    data: list[EndUserOut]
    next_cursor: str | None

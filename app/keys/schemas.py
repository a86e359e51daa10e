"""Admin API bodies. Money in dollars (exact decimals in, JSON numbers out)."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator

from app.budgets.periods import InvalidDuration, InvalidTimezone, load_timezone, parse_duration
from app.kit.times import to_utc

MAX_DOLLARS = Decimal(1_000_000_000)

Dollars = Field(default=None, ge=0, le=MAX_DOLLARS, allow_inf_nan=False)
NANO_DOLLAR = Decimal("1E-9")


def _not_below_a_nano(value: Decimal | None) -> Decimal | None:
    """A positive amount under the ledger's unit would be stored as 0: a budget that blocks
    every request (or alerts on the first spend), not the one asked for."""
    if value is not None and 0 < value < NANO_DOLLAR:
        raise ValueError("must be 0 or at least 0.000000001 (one nano-dollar, the ledger's unit)")
    return value


BudgetAmount = Annotated[Decimal | None, AfterValidator(_not_below_a_nano)]

MAX_ALERT_THRESHOLDS = 10
# A fraction of max_budget, to a hundredth of a percent (what the ledger stores: basis points).
AlertFraction = Annotated[Decimal, Field(gt=0, le=1, decimal_places=4, allow_inf_nan=False)]


def _ascending_once(value: list[Decimal]) -> list[Decimal]:
    return sorted(set(value))


AlertAt = (
    Annotated[
        list[AlertFraction],
        Field(max_length=MAX_ALERT_THRESHOLDS),
        AfterValidator(_ascending_once),
    ]
    | None
)
AlertAtField = Field(
    default=None,
    description="alert thresholds: fractions of max_budget (0.8 = 80 %), each alerted once per "
    "period; [] or null for none",
)


def _storable(value: Any) -> Any:
    """Reject what the ledger database cannot store (a 422, not a 500): NUL characters
    (PostgreSQL text), lone surrogates (not UTF-8) and NaN / Infinity (not JSON) -- at any
    depth of `metadata`, and in `alias` and `models`."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite (no NaN or Infinity)")
    elif isinstance(value, dict):
        for k, v in value.items():
            _storable(k)
            _storable(v)
    elif isinstance(value, list):
        for v in value:
            _storable(v)
    return value


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else to_utc(value)  # (InvalidTime is a ValueError: a 422)


class BudgetSettings(BaseModel):
    """The settings of one budget (the key's own, or an extra window)."""

    model_config = ConfigDict(extra="forbid")

    max_budget: BudgetAmount = Dollars
    budget_duration: str | None = None
    soft_budget: BudgetAmount = Dollars
    budget_timezone: str = "UTC"
    budget_anchor: datetime | None = None
    alert_at: AlertAt = AlertAtField

    @field_validator("budget_duration", mode="before")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return str(parse_duration(v))
        except InvalidDuration as exc:
            raise ValueError(str(exc)) from None

    @field_validator("budget_timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            load_timezone(v)
        except InvalidTimezone as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("budget_anchor")
    @classmethod
    def _anchor(cls, v: datetime | None) -> datetime | None:
        return _aware(v)


class BudgetEntry(BudgetSettings):
    """An extra budget (a window, a model budget, an end-user template entry): its amounts
    (max_budget, soft_budget) are in its unit -- dollars for usd, whole counts otherwise."""

    unit: Literal["usd", "tokens", "requests"] = "usd"
    models: list[str] | None = Field(
        default=None, max_length=1000, description="the models it applies to; null: every model"
    )

    _storable = field_validator("models")(_storable)

    @field_validator("models")
    @classmethod
    def _every_model(cls, v: list[str] | None) -> list[str] | None:
        return v or None  # [] is every model, like null


def _narrowed(entries: list[BudgetEntry]) -> list[BudgetEntry]:
    if any(not e.models for e in entries):
        raise ValueError("each model budget names its models (non-empty 'models')")
    return entries


Budgets: Any = Field(default_factory=list, max_length=20)
ModelBudgets = Annotated[list[BudgetEntry], Field(max_length=20), AfterValidator(_narrowed)]
EndUserTemplate = Annotated[list[BudgetEntry] | None, Field(max_length=20)]
ParallelLimit = Annotated[int | None, Field(ge=0, le=1_000_000)]
OwnerId = Annotated[str | None, Field(max_length=40)]


class KeyCreate(BudgetSettings):
    alias: str | None = Field(default=None, max_length=255)
    key: SecretStr | None = Field(
        default=None,
        description="passthrough mode: the existing upstream key to budget (stored as a hash)",
    )
    models: list[str] = Field(default_factory=list, max_length=1000)
    expires_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    shrink_to_fit: bool | None = None  # None: BUDGETGATE_SHRINK_TO_FIT decides
    budgets: list[BudgetEntry] = Budgets
    model_budgets: ModelBudgets = Budgets
    team_id: OwnerId = None
    user_id: OwnerId = None
    max_parallel_requests: ParallelLimit = None
    end_user_budget: EndUserTemplate = None

    _storable = field_validator("alias", "models", "metadata", "team_id", "user_id")(_storable)

    @field_validator("expires_at")
    @classmethod
    def _expires(cls, v: datetime | None) -> datetime | None:
        return _aware(v)

    @field_validator("key")
    @classmethod
    def _key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not (8 <= len(v.get_secret_value()) <= 512):
            raise ValueError("key must be 8 to 512 characters")
        return v


class BudgetUpdate(BaseModel):
    """Any subset of a budget's settings (a key's or an owner's primary budget); fields not
    sent are left as they are."""

    model_config = ConfigDict(extra="forbid")

    max_budget: BudgetAmount = Dollars
    soft_budget: BudgetAmount = Dollars
    budget_duration: str | None = None
    budget_timezone: str | None = None
    budget_anchor: datetime | None = None
    alert_at: AlertAt = AlertAtField

    _duration = field_validator("budget_duration", mode="before")(BudgetSettings._duration.__func__)  # type: ignore[attr-defined]
    _anchor = field_validator("budget_anchor")(BudgetSettings._anchor.__func__)  # type: ignore[attr-defined]

    @field_validator("budget_timezone")
    @classmethod
    def _timezone(cls, v: str | None) -> str | None:
        return None if v is None else BudgetSettings._timezone(v)


class KeyUpdate(BudgetUpdate):
    """Any subset of a key's settings; fields not sent are left as they are."""

    alias: str | None = Field(default=None, max_length=255)
    models: list[str] | None = Field(default=None, max_length=1000)
    expires_at: datetime | None = None
    metadata: dict[str, Any] | None = None
    shrink_to_fit: bool | None = None
    team_id: OwnerId = None
    user_id: OwnerId = None
    max_parallel_requests: ParallelLimit = None
    end_user_budget: EndUserTemplate = None
    # Either replaces every extra window with the two lists (the old ones retired).
    budgets: list[BudgetEntry] | None = Field(default=None, max_length=20)
    model_budgets: ModelBudgets | None = None

    _storable = field_validator("alias", "models", "metadata", "team_id", "user_id")(_storable)
    _expires = field_validator("expires_at")(BudgetSettings._anchor.__func__)  # type: ignore[attr-defined]


class BudgetOut(BaseModel):
    """A budget and its open period; amounts in its unit (dollars for usd, counts otherwise)."""

    budget_id: str
    unit: str = "usd"
    models: list[str] | None = None
    max_budget: float | int | None
    budget_duration: str | None
    soft_budget: float | int | None
    budget_timezone: str
    budget_anchor: datetime | None
    alert_at: list[float]
    spend: float | int
    reserved: float | int
    remaining: float | int | None
    period_start: datetime
    reset_at: datetime | None


class KeyOut(BaseModel):
    id: str
    alias: str | None
    key_prefix: str
    status: str
    mode: str
    max_budget: float | None
    budget_duration: str | None
    soft_budget: float | None
    budget_timezone: str
    budget_anchor: datetime | None
    alert_at: list[float]
    models: list[str]
    expires_at: datetime | None
    metadata: dict[str, Any]
    shrink_to_fit: bool | None = None
    created_at: datetime
    spend: float
    reserved: float
    remaining: float | None
    period_start: datetime
    reset_at: datetime | None
    budgets: list[BudgetOut] | None = None
    team_id: str | None = None
    user_id: str | None = None
    max_parallel_requests: int | None = None
    end_user_budget: list[dict[str, Any]] | None = None


class KeyCreated(KeyOut):
    key: str


class KeyList(BaseModel):
    data: list[KeyOut]
    next_cursor: str | None


class PeriodOut(BaseModel):
    budget_id: str
    unit: str = "usd"
    period_start: datetime
    period_end: datetime | None
    spend: float | int
    reserved: float | int
    max_budget: float | int | None
    closed_at: datetime | None
    close_reason: str | None


class PeriodList(BaseModel):
    data: list[PeriodOut]
